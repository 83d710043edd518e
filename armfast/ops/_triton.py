"""`triton` backend: the Triton kernels of `armfast.kernels` (flash attention, fused cosine logits).

This module allocates outputs, computes launch grids and calls the kernels; the public ops have
already validated the arguments. It imports `triton` at load (a missing Triton makes the registry
report this backend as unavailable), but the kernel modules only at the first launch: whether
they are compiled for the GPU or run by the interpreter is fixed when they are imported, and
`TRITON_INTERPRET=1` set after `import armfast` but before the first call still counts.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from types import SimpleNamespace

import torch
import triton
from torch import Tensor

from ._library import (affinity_first_pass, baseline_ops, define_attention,
                       define_patch_text_logits, empty, lse_dtype)
from ._reference import (GAUSSIAN_SELF_CORRELATION, MASKED_AFFINITY, SELF_CORRELATION,
                         SELF_CORRELATION_SUM)
from ._registry import Backend

MAX_HEAD_DIM = 128
MIN_CAPABILITY = (8, 0)  # bfloat16 tensor-core dots need Ampere (sm_80) or newer



@functools.cache
def _kernels() -> SimpleNamespace:
    """The kernel modules, imported at the first launch (see the module docstring)."""
    from armfast.kernels import _common, attention, baseline_attention, patch_text_logits
    return SimpleNamespace(common=_common, attention=attention, logits=patch_text_logits,
                           baselines=baseline_attention)


def _interpret_mode() -> bool:
    """Whether the kernels run (or, once imported, will run) under the Triton interpreter."""
    attention = sys.modules.get("armfast.kernels.attention")
    if attention is not None:
        return attention.INTERPRET
    from armfast.kernels._common import interpreting
    return interpreting()


def runtime_check(device: torch.device):
    """None when the kernels can run on `device` now, else the reason they cannot."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda is not available (no usable CUDA device or driver)"
        if not _interpret_mode():
            capability = torch.cuda.get_device_capability(device)
            if capability < MIN_CAPABILITY:
                return (f"needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                        f"or newer, found {capability[0]}.{capability[1]}")
        return None
    if device.type == "cpu" and not _interpret_mode():
        return ("set TRITON_INTERPRET=1 before importing armfast to run the Triton kernels on CPU "
                "(interpreter)")
    return None


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device; make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# CUDA launches at most 2**31 - 1 programs along grid axis 0 but only 65535 along axes 1 and 2,
# so every count that grows with the batch (B * H heads, B * N rows) goes on axis 0.
MAX_GRID = (2**31 - 1, 65535, 65535)


def launch_grid(*programs: int, what: str) -> tuple[int, ...]:
    """`programs` (per axis) as a launch grid, checked against `MAX_GRID`: a grid past CUDA's
    limits fails here with a ValueError naming `what`, not in the driver as "invalid argument"."""
    for axis, (n, limit) in enumerate(zip(programs, MAX_GRID)):
        if n > limit:
            raise ValueError(f"{what} needs {n} programs on launch grid axis {axis}, "
                             f"expected at most {limit} (CUDA's limit)")
    return programs


def attention_grid(batch_heads: int, length: int, block: int, what: str) -> tuple[int, int]:
    """(B * H, tiles of `block` over `length`): the attention kernels' grid. B * H passes 65535
    in real use (12 heads x 5462 crops); 65535 tiles would take sequences of 2 million tokens."""
    return launch_grid(batch_heads, triton.cdiv(length, block), what=what)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> Tensor:
    kernels, common = _kernels().attention, _kernels().common
    B, H, N_Q, d = q.shape
    N_K = k.shape[2]
    lse = empty((B, H, N_Q), lse_dtype(q.dtype), q.device)
    what = f"triton attention of q {tuple(q.shape)}"

    def grid(meta):
        return attention_grid(B * H, N_Q, meta["BLOCK_M"], what)

    with _on_device(q):
        kernels.attn_fwd[grid](
            q, k, v, out, lse, scale,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            H, N_Q, N_K, common.bucket(N_Q), common.bucket(N_K),
            HEAD_DIM=d, BLOCK_D=_block_d(d),
            ACC_DTYPE=common.acc_dtype(q.dtype), DOT_PRECISION=common.dot_precision(q.dtype))
    return lse


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    kernels, common = _kernels().attention, _kernels().common
    B, H, N_Q, d = q.shape
    N_K = k.shape[2]
    block_d, acc, precision = _block_d(d), common.acc_dtype(q.dtype), common.dot_precision(q.dtype)
    buckets = common.bucket(N_Q), common.bucket(N_K)
    delta = empty((B, H, N_Q), lse_dtype(q.dtype), q.device)  # contiguous: the kernels index it flat
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    qkv_strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride())
    q_what = f"triton attention backward of q {tuple(q.shape)}"
    k_what = f"triton attention backward of k {tuple(k.shape)}"

    with _on_device(q):
        block_m = kernels.BLOCK_M_PREPROCESS
        kernels.attn_bwd_preprocess[attention_grid(B * H, N_Q, block_m, q_what)](
            out, dout, delta, *out.stride(), *dout.stride(), H, N_Q,
            HEAD_DIM=d, BLOCK_D=block_d, ACC_DTYPE=acc, BLOCK_M=block_m)
        kernels.attn_bwd_dkdv[lambda meta: attention_grid(B * H, N_K, meta["BLOCK_N"], k_what)](
            q, k, v, dout, lse, delta, dk, dv, scale,
            *qkv_strides, *dk.stride(), *dv.stride(),
            H, N_Q, N_K, *buckets,
            HEAD_DIM=d, BLOCK_D=block_d, ACC_DTYPE=acc, DOT_PRECISION=precision)
        kernels.attn_bwd_dq[lambda meta: attention_grid(B * H, N_Q, meta["BLOCK_M"], q_what)](
            q, k, v, dout, lse, delta, dq, scale,
            *qkv_strides, *dq.stride(),
            H, N_Q, N_K, *buckets,
            HEAD_DIM=d, BLOCK_D=block_d, ACC_DTYPE=acc, DOT_PRECISION=precision)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# patch_text_logits; x [B, N, E] is launched as R = B * N rows, text [C, E] as [1, C, E]
# ---------------------------------------------------------------------------------------------

def _cos_grid(R: int, C: int, meta: dict, what: str) -> tuple[int]:
    """Flat grid of row tiles x text tiles (ptl_fwd, ptl_bwd_gcos): both counts can pass 65535."""
    return launch_grid(triton.cdiv(R, meta["BLOCK_R"]) * triton.cdiv(C, meta["BLOCK_C"]), what=what)


def patch_text_logits_forward(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    kernels, common = _kernels().logits, _kernels().common
    B, N, E = x.shape
    C, R = text.shape[0], B * N
    out = empty((B, N, C), x.dtype, x.device)
    what = f"triton patch_text_logits of x {tuple(x.shape)} and text {tuple(text.shape)}"

    with _on_device(x):
        kernels.ptl_fwd[lambda meta: _cos_grid(R, C, meta, what)](
            x, text, logit_scale, out, *x.stride(), *text.stride(), *out.stride(),
            R, N, C, E, common.bucket(R),
            ACC_DTYPE=common.acc_dtype(x.dtype), DOT_PRECISION=common.dot_precision(x.dtype))
    return out


def patch_text_logits_backward(dout: Tensor, x: Tensor, text: Tensor, logit_scale: Tensor,
                               text_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    kernels, common = _kernels().logits, _kernels().common
    B, N, E = x.shape
    C, R = text.shape[0], B * N
    acc, precision = common.acc_dtype(x.dtype), common.dot_precision(x.dtype)
    norm_dtype = lse_dtype(x.dtype)  # float32, float64 for float64 inputs
    x_norm = empty((R,), norm_dtype, x.device)
    t_norm = empty((C,), norm_dtype, x.device)
    gcos = empty((R, C), norm_dtype, x.device)  # dout * cos, reduced below in a fixed order
    dx = empty(x.shape, x.dtype, x.device)
    dtext = empty(text.shape, text.dtype, text.device)
    x_strides, t_strides = x.stride(), text.stride()
    strides = (*x_strides, *t_strides, *dout.stride())
    what = (f"triton patch_text_logits backward of x {tuple(x.shape)} "
            f"and text {tuple(text.shape)}")

    with _on_device(x):
        block_r, block_e = kernels.ROW_NORM_BLOCK_R, kernels.ROW_NORM_BLOCK_E
        kernels.row_norm[launch_grid(triton.cdiv(R, block_r), what=what)](
            x, x_norm, *x_strides, R, N, E, ACC_DTYPE=acc, BLOCK_R=block_r, BLOCK_E=block_e)
        kernels.row_norm[launch_grid(triton.cdiv(C, block_r), what=what)](
            text, t_norm, 0, *t_strides, C, C, E, ACC_DTYPE=acc, BLOCK_R=block_r, BLOCK_E=block_e)
        kernels.ptl_bwd_gcos[lambda meta: _cos_grid(R, C, meta, what)](
            x, text, dout, gcos, *strides, R, N, C, E, common.bucket(R),
            ACC_DTYPE=acc, DOT_PRECISION=precision)
        gc_row = gcos.sum(1)  # sum_c dout * cos, per row
        gc_col = gcos.sum(0)  # sum over rows, per text row
        dscale = gc_row.sum()
        kernels.ptl_bwd_dx[lambda meta: launch_grid(triton.cdiv(R, meta["BLOCK_R"]),
                                                    triton.cdiv(E, meta["BLOCK_E"]), what=what)](
            x, text, dout, logit_scale, x_norm, t_norm, gc_row, dx, *strides, *dx.stride(),
            R, N, C, E, common.bucket(R), ACC_DTYPE=acc, DOT_PRECISION=precision)
        kernels.ptl_bwd_dtext[lambda meta: launch_grid(triton.cdiv(C, meta["BLOCK_C"]),
                                                       triton.cdiv(E, meta["BLOCK_E"]), what=what)](
            x, text, dout, logit_scale, x_norm, t_norm, gc_col, dtext, *strides, *dtext.stride(),
            R, N, C, E, common.bucket(R), ACC_DTYPE=acc, DOT_PRECISION=precision)
    return dx, dtext, dscale.to(logit_scale.dtype).reshape(logit_scale.shape)


# ---------------------------------------------------------------------------------------------
# the baseline attentions, forward only (see `_library.ForwardOnlyOp` for the contract)
# ---------------------------------------------------------------------------------------------

def _self_correlation(x: Tensor, x2: Tensor | None, v: Tensor, out: Tensor, scale: float,
                      grid: tuple[int, bool, float] | None) -> None:
    """softmax(s x x^T [+ G]) v, or with x2 SCLIP's sum; grid = (width, class_token, sigma)."""
    kernels, common = _kernels().baselines, _kernels().common
    B, H, N, d = x.shape
    grid_w, class_token, sigma = grid or (1, False, 1.0)
    bias_coef = -kernels.LOG2E.value / (2.0 * sigma * sigma)
    y = x if x2 is None else x2
    what = f"triton self-correlation of x {tuple(x.shape)}"
    with _on_device(x):
        kernels.self_corr_fwd[lambda meta: attention_grid(B * H, N, meta["BLOCK_M"], what)](
            x, y, v, out, scale, bias_coef,
            *x.stride(), *y.stride(), *v.stride(), *out.stride(),
            H, N, grid_w, int(class_token), common.bucket(N),
            HEAD_DIM=d, BLOCK_D=_block_d(d),
            ACC_DTYPE=common.acc_dtype(x.dtype), DOT_PRECISION=common.dot_precision(x.dtype),
            DUAL=x2 is not None, BIAS=grid is not None)


def self_correlation_forward(x: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    _self_correlation(x, None, v, out, scale, None)


def self_correlation_sum_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    _self_correlation(q, k, v, out, scale, None)


def gaussian_self_correlation_forward(x: Tensor, v: Tensor, scale: float, grid_h: int, grid_w: int,
                                      sigma: float, class_token: bool, out: Tensor) -> None:
    _self_correlation(x, None, v, out, scale, (grid_w, class_token, sigma))


def masked_affinity_forward(f: Tensor, v: Tensor, beta: float, gamma: float, out: Tensor) -> None:
    kernels, common = _kernels().baselines, _kernels().common
    B, n, C = f.shape
    H, d = v.shape[1], v.shape[3]
    rnorm, thresh = affinity_first_pass(f, beta)
    what = f"triton masked affinity attention of f {tuple(f.shape)} and v {tuple(v.shape)}"

    def grid(meta):
        return launch_grid(B * triton.cdiv(H * d, meta["BLOCK_DV"]), triton.cdiv(n, meta["BLOCK_M"]),
                           what=what)

    with _on_device(f):
        kernels.masked_affinity_fwd[grid](
            f, rnorm, thresh, v, out, gamma,
            *f.stride(), *rnorm.stride(), *v.stride(), *out.stride(),
            n, C, H, common.bucket(n),
            HEAD_DIM=d, ACC_DTYPE=common.acc_dtype(f.dtype),
            DOT_PRECISION=common.dot_precision(f.dtype))


# The CPU entries run only under TRITON_INTERPRET=1; `runtime_check` says so otherwise.
BACKEND = Backend(
    name="triton",
    ops={"attention": define_attention("triton", attention_forward, attention_backward),
         "patch_text_logits": define_patch_text_logits(
             "triton", patch_text_logits_forward, patch_text_logits_backward),
         **baseline_ops("triton", {SELF_CORRELATION: self_correlation_forward,
                                   SELF_CORRELATION_SUM: self_correlation_sum_forward,
                                   GAUSSIAN_SELF_CORRELATION: gaussian_self_correlation_forward,
                                   MASKED_AFFINITY: masked_affinity_forward})},
    dtypes={"cuda": (torch.float16, torch.bfloat16, torch.float32),
            "cpu": (torch.float32, torch.float64)},
    head_dims=range(1, MAX_HEAD_DIM + 1),
    runtime_check=runtime_check,
)
