"""`triton` backend: the Triton kernels of `armfast.kernels` (flash attention, fused cosine
logits, the baseline attentions, SC-CLIP's similarity ops), launched by one module per op family: `attention`,
`patch_text_logits`, `baselines`, `similarity`; `_launch` holds what they share.

The launchers allocate outputs, compute launch grids and call the kernels; the public ops have
already validated the arguments and this backend's `LIMITS`. This package imports `triton` at
load (a missing Triton makes the registry report this backend as unavailable), but the kernel
modules only at the first launch (see `_launch`).
"""
from __future__ import annotations

import torch

from ..._limits import Limits
from ..._registry import fused_backend
from ..._specs import (AVERAGED_DUAL_SOFTMAX, GAUSSIAN_SELF_CORRELATION, MASKED_AFFINITY,
                       SELF_CORRELATION, SELF_CORRELATION_SUM, SIMILARITY_AGGREGATION)
from . import attention, baselines, patch_text_logits, similarity
from ._launch import interpret_mode

MAX_HEAD_DIM = 128
MIN_CAPABILITY = (8, 0)  # bfloat16 tensor-core dots need Ampere (sm_80) or newer
# The CPU entries run only under TRITON_INTERPRET=1; `runtime_check` says so otherwise.
LIMITS = Limits({"cuda": (torch.float16, torch.bfloat16, torch.float32),
                 "cpu": (torch.float32, torch.float64)}, head_dims=range(1, MAX_HEAD_DIM + 1))
FAMILIES = (attention, patch_text_logits, baselines, similarity)


def runtime_check(device: torch.device):
    """None when the kernels can run on `device` now, else the reason they cannot."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda is not available (no usable CUDA device or driver)"
        if not interpret_mode():
            capability = torch.cuda.get_device_capability(device)
            if capability < MIN_CAPABILITY:
                return (f"needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                        f"or newer, found {capability[0]}.{capability[1]}")
        return None
    if device.type == "cpu" and not interpret_mode():
        return ("set TRITON_INTERPRET=1 before importing armfast to run the Triton kernels on CPU "
                "(interpreter)")
    return None


def clear_tuners() -> None:
    """Forgets every family's kernels and tuners: the next launch makes fresh ones."""
    for family in FAMILIES:
        family.kernels.cache_clear()


BACKEND = fused_backend(
    "triton", LIMITS, runtime_check=runtime_check,
    attention=(attention.attention_forward, attention.attention_backward),
    patch_text_logits=(patch_text_logits.patch_text_logits_forward,
                       patch_text_logits.patch_text_logits_backward),
    baselines={SELF_CORRELATION: baselines.self_correlation_forward,
               SELF_CORRELATION_SUM: baselines.self_correlation_sum_forward,
               GAUSSIAN_SELF_CORRELATION: baselines.gaussian_self_correlation_forward,
               MASKED_AFFINITY: baselines.masked_affinity_forward,
               SIMILARITY_AGGREGATION: similarity.similarity_aggregation_forward,
               AVERAGED_DUAL_SOFTMAX: similarity.averaged_dual_softmax_forward})
