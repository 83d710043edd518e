"""`cpu` backend: the C++/OpenMP kernels of armfast._C (flash-style tiles), float32 and float64.

The baseline attentions (self_correlation, self_correlation_sum, gaussian_self_correlation,
masked_affinity_attention) and SC-CLIP's ops (similarity_aggregation, averaged_dual_softmax) are
forward kernels; their gradients recompute the reference math.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._library import empty, lse_dtype
from .._limits import DTYPE_NAMES, Limits
from .._registry import fused_backend
from .._specs import (AVERAGED_DUAL_SOFTMAX, GAUSSIAN_SELF_CORRELATION, MASKED_AFFINITY,
                      SELF_CORRELATION, SELF_CORRELATION_SUM, SIMILARITY_AGGREGATION)
from ._extension import arg, load, module

LIMITS = Limits({"cpu": (torch.float32, torch.float64)})


def runtime_check(device: torch.device) -> Optional[str]:
    return load("_C")[1]


def cpu_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> Tensor:
    lse = empty(q.shape[:3], lse_dtype(q.dtype), q.device)
    module("_C").attention_forward(DTYPE_NAMES[q.dtype], arg(q), arg(k), arg(v), arg(out),
                                   arg(lse), scale, torch.get_num_threads())
    return lse


def cpu_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           scale: float) -> tuple[Tensor, Tensor, Tensor]:
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    module("_C").attention_backward(
        DTYPE_NAMES[q.dtype], arg(dout), arg(q), arg(k), arg(v), arg(out), arg(lse),
        arg(dq), arg(dk), arg(dv), scale, torch.get_num_threads())
    return dq, dk, dv


def cpu_patch_text_logits_forward(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    out = empty((x.shape[0], x.shape[1], text.shape[0]), x.dtype, x.device)
    module("_C").patch_text_logits_forward(DTYPE_NAMES[x.dtype], arg(x), arg(text), arg(out),
                                           float(logit_scale), torch.get_num_threads())
    return out


def cpu_patch_text_logits_backward(dout: Tensor, x: Tensor, text: Tensor, logit_scale: Tensor,
                                   text_grad: bool = True) -> tuple[Tensor, Optional[Tensor], Tensor]:
    dx = empty(x.shape, x.dtype, x.device)
    dtext = empty(text.shape, text.dtype, text.device) if text_grad else None
    dscale = module("_C").patch_text_logits_backward(
        DTYPE_NAMES[x.dtype], arg(dout), arg(x), arg(text), float(logit_scale), arg(dx),
        None if dtext is None else arg(dtext), torch.get_num_threads())
    return dx, dtext, torch.full(logit_scale.shape, dscale, dtype=logit_scale.dtype,
                                 device=logit_scale.device)


# The baseline attentions (forward only; see `_library.ForwardOnlyOp` for the contract).

def cpu_self_correlation_forward(x: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    module("_C").self_correlation_forward(DTYPE_NAMES[x.dtype], arg(x), None, arg(v), arg(out),
                                          scale, None, torch.get_num_threads())


def cpu_self_correlation_sum_forward(q: Tensor, k: Tensor, v: Tensor, scale: float,
                                     out: Tensor) -> None:
    module("_C").self_correlation_forward(DTYPE_NAMES[q.dtype], arg(q), arg(k), arg(v),
                                          arg(out), scale, None, torch.get_num_threads())


def cpu_gaussian_self_correlation_forward(x: Tensor, v: Tensor, scale: float, grid_h: int,
                                          grid_w: int, sigma: float, class_token: bool,
                                          out: Tensor) -> None:
    module("_C").self_correlation_forward(DTYPE_NAMES[x.dtype], arg(x), None, arg(v), arg(out),
                                          scale, (grid_h, grid_w, class_token, sigma),
                                          torch.get_num_threads())


def cpu_masked_affinity_forward(f: Tensor, v: Tensor, beta: float, gamma: float, out: Tensor) -> None:
    module("_C").masked_affinity_forward(DTYPE_NAMES[f.dtype], arg(f), arg(v), arg(out), beta,
                                         gamma, torch.get_num_threads())


def cpu_similarity_aggregation_forward(f: Tensor, x: Tensor, threshold: float, out: Tensor) -> None:
    module("_C").similarity_aggregation_forward(DTYPE_NAMES[f.dtype], arg(f), arg(x), arg(out),
                                                threshold, torch.get_num_threads())


def cpu_averaged_dual_softmax_forward(f: Tensor, k: Tensor, v: Tensor, scale: float, beta: float,
                                      gamma: float, out: Tensor) -> None:
    module("_C").averaged_dual_softmax_forward(DTYPE_NAMES[f.dtype], arg(f), arg(k), arg(v),
                                               arg(out), scale, beta, gamma, torch.get_num_threads())


BACKEND = fused_backend(
    "cpu", LIMITS, runtime_check=runtime_check, device_types="cpu",
    attention=(cpu_attention_forward, cpu_attention_backward),
    patch_text_logits=(cpu_patch_text_logits_forward, cpu_patch_text_logits_backward),
    baselines={SELF_CORRELATION: cpu_self_correlation_forward,
               SELF_CORRELATION_SUM: cpu_self_correlation_sum_forward,
               GAUSSIAN_SELF_CORRELATION: cpu_gaussian_self_correlation_forward,
               MASKED_AFFINITY: cpu_masked_affinity_forward,
               SIMILARITY_AGGREGATION: cpu_similarity_aggregation_forward,
               AVERAGED_DUAL_SOFTMAX: cpu_averaged_dual_softmax_forward})
