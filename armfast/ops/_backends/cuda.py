"""`cuda` backend: the CUDA kernels of armfast._C_cuda (see `_extension` for how they are called).

The CUDA attention runs on tensor cores (FlashAttention-2 style, mma.sync) for float16 and
bfloat16, and for float32 on TF32 when torch allows TF32 matmuls
(`torch.backends.cuda.matmul.allow_tf32`, i.e. `torch.get_float32_matmul_precision() != "highest"`);
otherwise float32 runs on exact FP32 kernels. The backward accumulates dQ with fp32 atomics unless
`torch.are_deterministic_algorithms_enabled()`, which selects bitwise-reproducible kernels. Tiles
are picked per call from the GPU's shared memory and SM count; ARMFAST_CUDA_MAX_SHARED_MEMORY
(bytes) lowers the shared-memory limit, e.g. to run the small-memory tiles on any GPU.

The baseline attentions (self_correlation, self_correlation_sum, gaussian_self_correlation,
masked_affinity_attention) and SC-CLIP's ops (similarity_aggregation, averaged_dual_softmax) are
forward kernels (their gradients recompute the reference math), on tensor cores for
float16/bfloat16 and, when torch allows TF32, float32 (at precision 'highest' this backend refuses
float32 for them). The cosine similarities of ProxyCLIP and SC-CLIP, whose masks are discrete
decisions, are float32 whatever the dtype (float32 features: split into TF32 parts, 3 products).
"""
from __future__ import annotations

import functools
import re
from typing import Optional

import torch
from torch import Tensor

from .. import _affinity
from .._library import empty
from .._limits import DTYPE_NAMES, Limits
from .._registry import fused_backend
from .._specs import (AVERAGED_DUAL_SOFTMAX, GAUSSIAN_SELF_CORRELATION, MASKED_AFFINITY,
                      SELF_CORRELATION, SELF_CORRELATION_SUM, SIMILARITY_AGGREGATION)
from ._extension import arg, load, module

LIMITS = Limits({"cuda": (torch.float16, torch.bfloat16, torch.float32)}, head_dims=(32, 64, 128))


@functools.lru_cache(maxsize=None)
def _cuda_devices() -> tuple[int, Optional[str]]:
    """(number of devices armfast._C_cuda sees, None), or (0, why it sees none)."""
    compiled, reason = load("_C_cuda")
    if compiled is None:
        return 0, reason
    try:
        count = compiled.device_count()
    except RuntimeError as exc:  # no driver, driver too old for the runtime, ...
        return 0, f"the CUDA driver cannot be used by armfast._C_cuda ({exc})"
    if count == 0:
        return 0, "no CUDA device is visible"
    return count, None


def _arch_runs(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether code built for `arch_list` ("8.0;9.0a;10.0f;9.0+PTX", the syntax setup.py takes)
    runs on a GPU of `capability`, by nvcc's compatibility rules."""
    for item in filter(None, re.split(r"[;,\s]+", arch_list)):
        ptx = item.endswith("+PTX")
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", item[:-4] if ptx else item)
        if m is None:
            continue
        built, suffix = (int(m[1]), int(m[2])), m[3]
        same_family = capability[0] == built[0] and capability[1] >= built[1]
        if suffix == "a":
            runs = capability == built  # arch-specific: that exact GPU only, PTX included
        elif suffix == "f":
            runs = same_family  # family-specific: same major, this minor or newer, PTX included
        elif ptx:
            runs = capability >= built  # the driver compiles plain PTX for any newer GPU
        else:
            runs = same_family  # a cubin runs on later minor versions of its major
        if runs:
            return True
    return False


def runtime_check(device: torch.device) -> Optional[str]:
    count, reason = _cuda_devices()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "torch.cuda is not available (a CPU-only torch build, or no usable driver)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= count:
        return f"cuda:{index} does not exist (armfast._C_cuda sees {count} device(s))"
    capability = torch.cuda.get_device_capability(index)
    archs = module("_C_cuda").build_info()["cuda_archs"]
    if not _arch_runs(archs, capability):
        return (f"armfast._C_cuda was built for {archs}, which cannot run on cuda:{index} "
                f"(compute capability {capability[0]}.{capability[1]}); rebuild with "
                f"ARMFAST_CUDA_ARCH_LIST=\"{capability[0]}.{capability[1]}\" (8.0 or newer)")
    return None


def _launch(t: Tensor) -> tuple[int, int]:
    """(device index, handle of torch's current stream on it): the kernels run there, in order
    with torch's own work."""
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def _allow_tf32(dtype: torch.dtype) -> bool:
    """float32 may run on TF32 tensor cores: torch allows TF32 for float32 matmuls."""
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def cuda_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> Tensor:
    """Writes out ([B, H, Nq, d], any strides, e.g. a view of a [B, Nq, H, d] buffer); returns lse."""
    lse = empty(q.shape[:3], torch.float32, q.device)
    module("_C_cuda").attention_forward(DTYPE_NAMES[q.dtype], arg(q), arg(k), arg(v),
                                        arg(out), arg(lse), float(scale),
                                        _allow_tf32(q.dtype), *_launch(q))
    return lse


def cuda_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                            scale: float) -> tuple[Tensor, Tensor, Tensor]:
    compiled = module("_C_cuda")
    B, H, Nq, d = q.shape
    tf32 = _allow_tf32(q.dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    atomic_dq = not deterministic and (q.dtype != torch.float32 or tf32)
    workspace = empty((compiled.attention_backward_workspace(B, H, Nq, d, atomic_dq),),
                      torch.float32, q.device)
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    compiled.attention_backward(
        DTYPE_NAMES[q.dtype], arg(dout), arg(q), arg(k), arg(v), arg(out), arg(lse),
        arg(workspace), arg(dq), arg(dk), arg(dv), float(scale), tf32, deterministic,
        *_launch(q))
    return dq, dk, dv


def _cuda_logit_scale(logit_scale: Tensor) -> Tensor:
    """The kernels read the scale as one float32 on x's device (the op layer put it there)."""
    return logit_scale.detach().to(torch.float32).reshape(1).contiguous()


def cuda_patch_text_logits_forward(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    compiled = module("_C_cuda")
    B, N, E = x.shape
    C = text.shape[0]
    scale = _cuda_logit_scale(logit_scale)
    out = empty((B, N, C), x.dtype, x.device)
    workspace = empty((compiled.patch_text_logits_workspace(B * N, C, E, False),), torch.float32,
                       x.device)
    compiled.patch_text_logits_forward(DTYPE_NAMES[x.dtype], arg(x), arg(text), arg(scale),
                                       arg(out), arg(workspace), _allow_tf32(x.dtype),
                                       *_launch(x))
    return out


def cuda_patch_text_logits_backward(dout: Tensor, x: Tensor, text: Tensor, logit_scale: Tensor,
                                    text_grad: bool = True) -> tuple[Tensor, Optional[Tensor], Tensor]:
    compiled = module("_C_cuda")
    B, N, E = x.shape
    C = text.shape[0]
    scale = _cuda_logit_scale(logit_scale)
    dx = empty(x.shape, x.dtype, x.device)
    dtext = empty(text.shape, text.dtype, text.device) if text_grad else None
    dscale = empty((1,), torch.float32, x.device)
    workspace = empty((compiled.patch_text_logits_workspace(B * N, C, E, True),), torch.float32,
                       x.device)
    compiled.patch_text_logits_backward(
        DTYPE_NAMES[x.dtype], arg(dout), arg(x), arg(text), arg(scale), arg(dx),
        None if dtext is None else arg(dtext), arg(dscale), arg(workspace),
        _allow_tf32(x.dtype), *_launch(x))
    return dx, dtext, dscale.to(logit_scale.dtype).reshape(logit_scale.shape)


# The baseline attentions, forward only, on tensor cores: float32 only as TF32.

def _tf32_only(op: str, dtype: torch.dtype) -> None:
    """The baseline kernels' float32 is TF32: a limit that torch's matmul precision switches at
    run time, so it is checked per call rather than declared in `LIMITS`."""
    if dtype == torch.float32 and not _allow_tf32(dtype):
        raise TypeError(f"backend 'cuda' runs {op} in float32 on TF32 tensor cores only, which torch's "
                        f"float32 matmul precision 'highest' forbids: use float16/bfloat16, "
                        f"torch.set_float32_matmul_precision('high'), or backend='triton'/'sdpa'")


def _cuda_self_correlation(op, x, x2, v, out, scale, grid) -> None:
    _tf32_only(op, x.dtype)
    module("_C_cuda").self_correlation_forward(
        DTYPE_NAMES[x.dtype], arg(x), None if x2 is None else arg(x2), arg(v), arg(out), float(scale),
        grid, _allow_tf32(x.dtype), *_launch(x))


def cuda_self_correlation_forward(x: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    _cuda_self_correlation("self_correlation", x, None, v, out, scale, None)


def cuda_self_correlation_sum_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    _cuda_self_correlation("self_correlation_sum", q, k, v, out, scale, None)


def cuda_gaussian_self_correlation_forward(x: Tensor, v: Tensor, scale: float, grid_h: int, grid_w: int,
                                           sigma: float, class_token: bool, out: Tensor) -> None:
    _cuda_self_correlation("gaussian_self_correlation", x, None, v, out, scale,
                           (grid_h, grid_w, class_token, sigma))


def cuda_masked_affinity_forward(f: Tensor, v: Tensor, beta: float, gamma: float, out: Tensor) -> None:
    _tf32_only("masked_affinity_attention", f.dtype)
    rnorm, thresh = _affinity.first_pass(f, beta)
    compiled = module("_C_cuda")
    B, n, C = f.shape
    # a batch too small to fill the GPU splits the keys into ranges, combined from this workspace
    size = compiled.masked_affinity_workspace(B, n, C, v.shape[1], v.shape[3], f.device.index)
    workspace = empty((max(size, 1),), torch.float32, f.device)  # the binding takes no empty tensor
    compiled.masked_affinity_forward(
        DTYPE_NAMES[f.dtype], arg(f), arg(rnorm), arg(thresh), arg(v), arg(out), float(gamma),
        arg(workspace), _allow_tf32(f.dtype), *_launch(f))


def cuda_similarity_aggregation_forward(f: Tensor, x: Tensor, threshold: float, out: Tensor) -> Tensor:
    """Writes W x / (rowsum(W) + 1e-6) into `out`; returns the saved statistic rowsum(W) [B, N]."""
    _tf32_only("similarity_aggregation", f.dtype)
    rnorm, _ = _affinity.first_pass(f, 0.0)
    rowsum = empty(f.shape[:2], torch.float32, f.device)
    module("_C_cuda").similarity_aggregation_forward(
        DTYPE_NAMES[f.dtype], arg(f), arg(rnorm), arg(x), arg(out), arg(rowsum), float(threshold),
        _allow_tf32(f.dtype), *_launch(f))
    return rowsum


def cuda_averaged_dual_softmax_forward(f: Tensor, k: Tensor, v: Tensor, scale: float, beta: float,
                                       gamma: float, out: Tensor) -> tuple[Tensor, Tensor]:
    """Writes ((P_mask + softmax(scale k k^T)) / 2) v into `out`; returns the saved statistics,
    both softmaxes' row lse [B, H, N]."""
    _tf32_only("averaged_dual_softmax", f.dtype)
    rnorm, thresh = _affinity.first_pass(f, beta)
    lse_mask, lse_kk = (empty(k.shape[:3], torch.float32, k.device) for _ in range(2))
    module("_C_cuda").averaged_dual_softmax_forward(
        DTYPE_NAMES[f.dtype], arg(f), arg(rnorm), arg(thresh), arg(k), arg(v), arg(out),
        arg(lse_mask), arg(lse_kk), float(scale), float(gamma), _allow_tf32(f.dtype), *_launch(f))
    return lse_mask, lse_kk


BACKEND = fused_backend(
    "cuda", LIMITS, runtime_check=runtime_check, device_types="cuda",
    attention=(cuda_attention_forward, cuda_attention_backward),
    patch_text_logits=(cuda_patch_text_logits_forward, cuda_patch_text_logits_backward),
    baselines={SELF_CORRELATION: cuda_self_correlation_forward,
               SELF_CORRELATION_SUM: cuda_self_correlation_sum_forward,
               GAUSSIAN_SELF_CORRELATION: cuda_gaussian_self_correlation_forward,
               MASKED_AFFINITY: cuda_masked_affinity_forward,
               SIMILARITY_AGGREGATION: cuda_similarity_aggregation_forward,
               AVERAGED_DUAL_SOFTMAX: cuda_averaged_dual_softmax_forward})
