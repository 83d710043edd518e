"""The compute precision of inference and training: mixed precision on GPUs, float32 elsewhere.

``"auto"`` is bfloat16 autocast on CUDA and float32 on every other device; ``"bf16"`` and
``"fp16"`` ask for that autocast dtype anywhere torch supports it (CPU autocast takes bf16);
``"fp32"`` turns autocast off. Under autocast the matmuls run in the low dtype while armfast
keeps the softmax statistics of its attentions (running max and log-sum-exp) and the cosine
logits in float32.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def check_precision(precision) -> str:
    if not isinstance(precision, str) or precision.lower() not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision.lower()


def autocast_dtype(precision: str, device: torch.device | str) -> Optional[torch.dtype]:
    """The autocast dtype of `precision` on `device`, None for float32 (no autocast)."""
    precision, device = check_precision(precision), torch.device(device)
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    dtype = _DTYPES[precision]
    if dtype is torch.float16 and device.type == "cpu":
        raise ValueError("precision 'fp16' needs a GPU (CPU autocast runs in bf16); use 'bf16' "
                         "or 'fp32' on CPU")
    return dtype


def autocast(device: torch.device | str, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for `dtype` (a no-op context for None). The weight-cast cache is off:
    CUDA graphs must not read casts that autocast frees when its region ends, and in inference
    each weight is used once per call anyway."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)


def describe(dtype: Optional[torch.dtype]) -> str:
    return "float32" if dtype is None else f"{str(dtype).replace('torch.', '')} autocast"
