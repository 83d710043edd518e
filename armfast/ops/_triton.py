"""`triton` backend: the Triton kernels of `armfast.kernels` (flash attention, fused cosine logits).

This module allocates outputs, computes launch grids and calls the kernels; the public ops have
already validated the arguments. It imports `triton` at load (a missing Triton makes the registry
report this backend as unavailable), but the kernel modules only at the first launch: whether
they are compiled for the GPU or run by the interpreter is fixed when they are imported, and
`TRITON_INTERPRET=1` set after `import armfast` but before the first call still counts.

A call costs host time that a microsecond kernel cannot hide, so the launch path does little:
one tuple key and one dict lookup for the chosen config (`kernels/_tuning.py`: chosen once per
size bucket, remembered on disk), the flat grid from one division, and `JITFunction.run` with
the config's keyword arguments prepared when it was chosen. Nothing is rebuilt per call.
"""
from __future__ import annotations

import contextlib
import functools
import math
import sys
from types import SimpleNamespace

import torch
import triton
from torch import Tensor

try:  # Hopper's TMA tensor descriptors, as Triton >= 3.4 offers them from the host
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from ._library import (affinity_first_pass, baseline_ops, define_attention,
                       define_patch_text_logits, empty, lse_dtype)
from ._reference import (GAUSSIAN_SELF_CORRELATION, MASKED_AFFINITY, SELF_CORRELATION,
                         SELF_CORRELATION_SUM)
from ._registry import Backend

MAX_HEAD_DIM = 128
MIN_CAPABILITY = (8, 0)  # bfloat16 tensor-core dots need Ampere (sm_80) or newer
# CUDA launches at most 2**31 - 1 programs along grid axis 0 (65535 along axes 1 and 2); every
# kernel here runs on a flat axis-0 grid and decodes (batch * head, tile) itself.
MAX_PROGRAMS = 2**31 - 1
# From this many query rows (B * H * N_Q) on, TMA configs join the forward's candidates. Below,
# a forward takes microseconds on the GPU and its four descriptors per call would cost more host
# time than they can save.
TMA_MIN_ROWS = 1 << 16


@functools.cache
def _kernels() -> SimpleNamespace:
    """The kernel modules and their tuners, made at the first launch (see the module docstring)."""
    from armfast.kernels import _common, _tuning, attention, baseline_attention as baselines
    from armfast.kernels import patch_text_logits as logits
    tuner = _tuning.Tuner
    return SimpleNamespace(
        common=_common, tuning=_tuning, attention=attention, logits=logits, baselines=baselines,
        self_corr_fwd=tuner("self_corr_fwd", baselines.self_corr_fwd),
        masked_affinity_fwd=tuner("masked_affinity_fwd", baselines.masked_affinity_fwd),
        attn_fwd=tuner("attn_fwd", attention.attn_fwd),
        attn_bwd=tuner("attn_bwd", attention.attn_bwd_preprocess, attention.attn_bwd),
        attn_bwd_dq=tuner("attn_bwd_dq", attention.attn_bwd_dq),
        ptl_fwd=tuner("ptl_fwd", logits.ptl_fwd),
        ptl_gcos=tuner("ptl_bwd_gcos", logits.ptl_bwd_gcos),
        ptl_dx=tuner("ptl_bwd_dx", logits.ptl_bwd_dx),
        ptl_dtext=tuner("ptl_bwd_dtext", logits.ptl_bwd_dtext),
    )


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


_SAME_DEVICE = contextlib.nullcontext()


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device; make it the tensor's one (switching only when
    it differs: a device guard costs microseconds)."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _SAME_DEVICE


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _kind(dtype: torch.dtype, precision: str) -> str:
    """Which config list applies: tensor-core half precision, TF32, or plain float32 FMAs."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "tf32" if precision == "tf32" else "fp32"


def flat_grid(units: int, length: int, block: int, what: str, *tensors: Tensor) -> tuple[int]:
    """(units * tiles of `block` over `length`,): the flat grid of one program per (unit, tile),
    checked against CUDA's limit so that an oversized launch fails here with a ValueError naming
    the op (`what`, its "{}" filled with the shapes of `tensors`), not in the driver as "invalid
    argument". The message is formatted only then: the launch path builds nothing per call."""
    programs = units * ((length + block - 1) // block)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{what.format(*(tuple(t.shape) for t in tensors))} needs {programs} "
                         f"programs on launch grid axis 0, expected at most {MAX_PROGRAMS} "
                         "(CUDA's limit)")
    return (programs,)


def _tune(tuner, key, constexprs: dict, configs, config_args: tuple, interpret_config, device,
          run):
    """The config of `key`, chosen now (a miss of `tuner.best`) among
    `configs(family, *config_args)` for the device's GPU family."""
    return tuner.tune(key, constexprs, lambda family: configs(family, *config_args),
                      interpret_config, device, run)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def _attention_key(q: Tensor, N_K: int, precision: str, *extra) -> tuple:
    B, H, N_Q, d = q.shape
    bucket = _kernels().tuning.bucket
    return (q.dtype, d, bucket(N_Q), bucket(N_K), bucket(B * H, 1, 1024), precision, *extra,
            q.get_device())


def attention_constexprs(q: Tensor, precision: str, **extra) -> dict:
    """The compile-time arguments the attention kernels take for `q` (besides tile sizes)."""
    d = q.shape[-1]
    return {"HEAD_DIM": d, "BLOCK_D": _block_d(d),
            "ACC_DTYPE": _kernels().common.acc_dtype(q.dtype), "DOT_PRECISION": precision,
            **extra}


def _attention_tune(tuner, key, q: Tensor, precision: str, configs, run, **extra):
    constexprs = attention_constexprs(q, precision, **extra)
    return _tune(tuner, key, constexprs, configs,
                 (_kind(q.dtype, precision), constexprs["BLOCK_D"]),
                 _kernels().attention.INTERPRET_CONFIG, q.device, run)


def _tma_ready(*tensors: Tensor) -> bool:
    """Whether TMA descriptors can describe these [B, H, N, d] tensors: d a power of two in
    [16, 128] (one tile spans the head dim), a contiguous last dimension, 16-byte aligned base
    and strides."""
    if TensorDescriptor is None or tensors[0].shape[3] != _block_d(tensors[0].shape[3]):
        return False
    for t in tensors:
        size, strides = t.element_size(), t.stride()
        if strides[3] != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in strides[:3]):
            return False
    return True


def _fwd_configs(family: str, kind: str, block_d: int, tma: bool) -> list:
    attention = _kernels().attention
    return attention.fwd_configs(family, kind, block_d) + (
        attention.fwd_tma_configs(family, kind, block_d) if tma else [])


def _descriptor(t: Tensor, rows: int):
    return TensorDescriptor(t, t.shape, t.stride(), [1, 1, rows, t.shape[3]])


ATTENTION = "triton attention of q {}"
ATTENTION_BWD = "triton attention backward of q {} and k {}"
LOGITS = "triton patch_text_logits of x {} and text {}"


def _launch_fwd(q, k, v, out, lse, scale, launch, warmup=False):
    B, H, N_Q, _ = q.shape
    if launch.variant == "tma":
        block_m, block_n = launch["BLOCK_M"], launch["BLOCK_N"]
        return _kernels().attention.attn_fwd_tma.run(
            _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n),
            _descriptor(out, block_m), lse, scale, H, N_Q, k.shape[2],
            grid=flat_grid(B * H, N_Q, block_m, ATTENTION, q), warmup=warmup, **launch.kwargs)
    return _kernels().attention.attn_fwd.run(
        q, k, v, out, lse, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N_Q, k.shape[2],
        grid=flat_grid(B * H, N_Q, launch["BLOCK_M"], ATTENTION, q), warmup=warmup,
        **launch.kwargs)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> Tensor:
    """Writes softmax(q k^T * scale) v into `out` (any strides); returns the row lse."""
    ks = _kernels()
    B, H, N_Q, _ = q.shape
    lse = empty((B, H, N_Q), lse_dtype(q.dtype), q.device)
    precision = ks.common.dot_precision(q.dtype)
    tma = B * H * N_Q >= TMA_MIN_ROWS and _tma_ready(q, k, v, out)
    key = _attention_key(q, k.shape[2], precision, tma)
    launch = ks.attn_fwd.best.get(key)
    with _on_device(q):
        if launch is None:
            launch = _attention_tune(ks.attn_fwd, key, q, precision,
                                     functools.partial(_fwd_configs, tma=tma),
                                     functools.partial(_launch_fwd, q, k, v, out, lse, scale))
        _launch_fwd(q, k, v, out, lse, scale, launch)
    return lse


def _launch_bwd(dout, q, k, v, lse, delta, dk, dv, dq_acc, out, scale, launch, warmup=False):
    """delta (and, on the atomic path, dq_acc = 0), then dK, dV (and dQ) in one pass."""
    ks = _kernels().attention
    B, H, N_Q, d = q.shape
    N_K = k.shape[2]
    atomic = launch["DQ_ATOMIC"]
    ks.attn_bwd_preprocess.run(
        out, dout, delta, dq_acc, *out.stride(), *dout.stride(), H, N_Q,
        grid=flat_grid(B * H, N_Q, ks.BLOCK_M_PREPROCESS, ATTENTION_BWD, q, k),
        warmup=warmup, HEAD_DIM=d, BLOCK_D=launch["BLOCK_D"], ACC_DTYPE=launch["ACC_DTYPE"],
        ZERO_DQ=atomic, BLOCK_M=ks.BLOCK_M_PREPROCESS)
    ks.attn_bwd.run(
        q, k, v, dout, lse, delta, dk, dv, dq_acc, scale,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), H, N_Q, N_K,
        grid=flat_grid(B * H, N_K, launch["BLOCK_N"], ATTENTION_BWD, q, k),
        warmup=warmup, **launch.kwargs)


def _launch_bwd_dq(dout, q, k, v, lse, delta, dq, scale, launch, warmup=False):
    B, H, N_Q, _ = q.shape
    _kernels().attention.attn_bwd_dq.run(
        q, k, v, dout, lse, delta, dq, scale,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        H, N_Q, k.shape[2],
        grid=flat_grid(B * H, N_Q, launch["BLOCK_M"], ATTENTION_BWD, q, k),
        warmup=warmup, **launch.kwargs)


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv. dQ is summed with float32 atomics, or, when
    `torch.use_deterministic_algorithms(True)` is on, by a separate kernel (bit-reproducible)."""
    ks = _kernels()
    B, H, N_Q, _ = q.shape
    lse = lse.contiguous()  # the kernels index it flat (it is, as the forward made it)
    acc_dtype = lse_dtype(q.dtype)  # float32, float64 for float64 inputs
    deterministic = torch.are_deterministic_algorithms_enabled()
    precision = ks.common.dot_precision(q.dtype)
    dk = empty(k.shape, k.dtype, k.device)  # contiguous: the kernels index dk, dv flat
    dv = empty(v.shape, v.dtype, v.device)
    dq = empty(q.shape, q.dtype, q.device)
    # delta [B, H, N_Q] and, on the atomic path for half precision, the float32 dQ accumulator
    # (zeroed by the preprocess kernel) share one scratch allocation; float32 accumulates
    # straight into dq
    separate_acc = not deterministic and q.dtype != acc_dtype
    rows = B * H * N_Q
    start = rows + -rows % 32  # dq_acc 128-byte aligned, as its own allocation would be
    scratch = empty((start + rows * q.shape[3] if separate_acc else rows,), acc_dtype, q.device)
    delta = scratch[:rows]
    dq_acc = scratch[start:].view(q.shape) if separate_acc else dq
    key = _attention_key(q, k.shape[2], precision, deterministic)
    launch = ks.attn_bwd.best.get(key)
    with _on_device(q):
        if launch is None:
            launch = _attention_tune(ks.attn_bwd, key, q, precision, ks.attention.bwd_configs,
                                     functools.partial(_launch_bwd, dout, q, k, v, lse, delta,
                                                       dk, dv, dq_acc, out, scale),
                                     DQ_ATOMIC=not deterministic)
        _launch_bwd(dout, q, k, v, lse, delta, dk, dv, dq_acc, out, scale, launch)
        if deterministic:
            dq_launch = ks.attn_bwd_dq.best.get(key)
            if dq_launch is None:
                dq_launch = _attention_tune(ks.attn_bwd_dq, key, q, precision,
                                            ks.attention.bwd_dq_configs,
                                            functools.partial(_launch_bwd_dq, dout, q, k, v,
                                                              lse, delta, dq, scale))
            _launch_bwd_dq(dout, q, k, v, lse, delta, dq, scale, dq_launch)
        elif separate_acc:
            dq.copy_(dq_acc)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# patch_text_logits; x [B, N, E] is launched as R = B * N rows, text [C, E] as [1, C, E]
# ---------------------------------------------------------------------------------------------

def _logits_key(x: Tensor, C: int, precision: str) -> tuple:
    B, N, E = x.shape
    bucket = _kernels().tuning.bucket
    return (x.dtype, bucket(E), bucket(C), bucket(B * N), precision, x.get_device())


def _logits_tune(tuner, key, x: Tensor, precision: str, configs, run):
    constexprs = {"ACC_DTYPE": _kernels().common.acc_dtype(x.dtype), "DOT_PRECISION": precision}
    return _tune(tuner, key, constexprs, configs, (_kind(x.dtype, precision),),
                 _kernels().logits.INTERPRET_CONFIG, x.device, run)


def _tiles(R: int, C: int, launch, x: Tensor, text: Tensor) -> tuple[int]:
    """Flat grid of row tiles x text tiles (ptl_fwd, ptl_bwd_gcos)."""
    return flat_grid((R + launch["BLOCK_R"] - 1) // launch["BLOCK_R"], C, launch["BLOCK_C"],
                     LOGITS, x, text)


def _as_rows(N: int, *tensors: Tensor) -> tuple[int, list]:
    """[B, N, X] tensors read as B * N rows: (rows per batch, (stride_b, stride_n, stride_x) of
    each). When every tensor's rows are evenly spaced (the usual case) they are one batch of
    B * N rows, so no stride changes with B or N: strides are specialised, and a changed one would
    recompile."""
    if all(t.shape[0] == 1 or t.stride(0) == N * t.stride(1) for t in tensors):
        return tensors[0].shape[0] * N, [(0, t.stride(1), t.stride(2)) for t in tensors]
    return N, [t.stride() for t in tensors]


def _launch_ptl_fwd(x, text, logit_scale, out, launch, warmup=False):
    B, N, E = x.shape
    C = text.shape[0]
    per_batch, (x_strides, out_strides) = _as_rows(N, x, out)
    _kernels().logits.ptl_fwd.run(
        x, text, logit_scale, out, *x_strides, *text.stride(), *out_strides, B * N, per_batch, C,
        E, grid=_tiles(B * N, C, launch, x, text), warmup=warmup, **launch.kwargs)


def patch_text_logits_forward(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    ks = _kernels()
    B, N, _ = x.shape
    C = text.shape[0]
    out = empty((B, N, C), x.dtype, x.device)
    precision = ks.common.dot_precision(x.dtype)
    key = _logits_key(x, C, precision)
    launch = ks.ptl_fwd.best.get(key)
    with _on_device(x):
        if launch is None:
            launch = _logits_tune(ks.ptl_fwd, key, x, precision, ks.logits.fwd_configs,
                                  functools.partial(_launch_ptl_fwd, x, text, logit_scale, out))
        _launch_ptl_fwd(x, text, logit_scale, out, launch)
    return out


def _launch_ptl_gcos(x, text, dout, gcos, launch, warmup=False):
    B, N, E = x.shape
    C = text.shape[0]
    per_batch, (x_strides, g_strides) = _as_rows(N, x, dout)
    _kernels().logits.ptl_bwd_gcos.run(
        x, text, dout, gcos, *x_strides, *text.stride(), *g_strides, B * N, per_batch, C, E,
        grid=_tiles(B * N, C, launch, x, text), warmup=warmup, **launch.kwargs)


def _launch_ptl_dx(x, text, dout, logit_scale, x_norm, t_norm, gc_row, dx, launch, warmup=False):
    B, N, E = x.shape
    per_batch, (x_strides, g_strides, dx_strides) = _as_rows(N, x, dout, dx)
    _kernels().logits.ptl_bwd_dx.run(
        x, text, dout, logit_scale, x_norm, t_norm, gc_row, dx,
        *x_strides, *text.stride(), *g_strides, *dx_strides, B * N, per_batch, text.shape[0], E,
        grid=flat_grid((B * N + launch["BLOCK_R"] - 1) // launch["BLOCK_R"], E,
                       launch["BLOCK_E"], LOGITS, x, text),
        warmup=warmup, **launch.kwargs)


def _launch_ptl_dtext(x, text, dout, logit_scale, x_norm, t_norm, gc_col, dtext, launch,
                      warmup=False):
    B, N, E = x.shape
    C = text.shape[0]
    per_batch, (x_strides, g_strides) = _as_rows(N, x, dout)
    _kernels().logits.ptl_bwd_dtext.run(
        x, text, dout, logit_scale, x_norm, t_norm, gc_col, dtext,
        *x_strides, *text.stride(), *g_strides, *dtext.stride(), B * N, per_batch, C, E,
        grid=flat_grid((C + launch["BLOCK_C"] - 1) // launch["BLOCK_C"], E, launch["BLOCK_E"],
                       LOGITS, x, text),
        warmup=warmup, **launch.kwargs)


def patch_text_logits_backward(dout: Tensor, x: Tensor, text: Tensor, logit_scale: Tensor,
                               text_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dtext (None without `text_grad`: frozen class embeddings skip that pass) and
    dlogit_scale."""
    ks = _kernels()
    logits = ks.logits
    B, N, E = x.shape
    C, R = text.shape[0], B * N
    precision = ks.common.dot_precision(x.dtype)
    acc = ks.common.acc_dtype(x.dtype)
    norm_dtype = lse_dtype(x.dtype)  # float32, float64 for float64 inputs
    x_norm = empty((R,), norm_dtype, x.device)
    t_norm = empty((C,), norm_dtype, x.device)
    gcos = empty((R, C), norm_dtype, x.device)  # dout * cos, reduced below in a fixed order
    dx = empty(x.shape, x.dtype, x.device)
    key = _logits_key(x, C, precision)
    block_r, block_e = logits.ROW_NORM_BLOCK_R, logits.ROW_NORM_BLOCK_E
    rows_per_batch, (x_strides,) = _as_rows(N, x)

    with _on_device(x):
        logits.row_norm.run(x, x_norm, *x_strides, R, rows_per_batch, E,
                            grid=flat_grid(1, R, block_r, LOGITS, x, text), warmup=False,
                            ACC_DTYPE=acc, BLOCK_R=block_r, BLOCK_E=block_e)
        logits.row_norm.run(text, t_norm, 0, *text.stride(), C, C, E,
                            grid=flat_grid(1, C, block_r, LOGITS, x, text), warmup=False,
                            ACC_DTYPE=acc, BLOCK_R=block_r, BLOCK_E=block_e)
        launch = ks.ptl_gcos.best.get(key)
        if launch is None:
            launch = _logits_tune(ks.ptl_gcos, key, x, precision, logits.fwd_configs,
                                  functools.partial(_launch_ptl_gcos, x, text, dout, gcos))
        _launch_ptl_gcos(x, text, dout, gcos, launch)
        gc_row = gcos.sum(1)  # sum_c dout * cos, per row
        dscale = gc_row.sum()
        launch = ks.ptl_dx.best.get(key)
        if launch is None:
            launch = _logits_tune(ks.ptl_dx, key, x, precision, logits.dx_configs,
                                  functools.partial(_launch_ptl_dx, x, text, dout, logit_scale,
                                                    x_norm, t_norm, gc_row, dx))
        _launch_ptl_dx(x, text, dout, logit_scale, x_norm, t_norm, gc_row, dx, launch)
        if not text_grad:
            return dx, None, dscale.to(logit_scale.dtype).reshape(logit_scale.shape)
        gc_col = gcos.sum(0)  # sum over rows, per text row
        dtext = empty(text.shape, text.dtype, text.device)
        launch = ks.ptl_dtext.best.get(key)
        if launch is None:
            launch = _logits_tune(ks.ptl_dtext, key, x, precision, logits.dtext_configs,
                                  functools.partial(_launch_ptl_dtext, x, text, dout,
                                                    logit_scale, x_norm, t_norm, gc_col, dtext))
        _launch_ptl_dtext(x, text, dout, logit_scale, x_norm, t_norm, gc_col, dtext, launch)
    return dx, dtext, dscale.to(logit_scale.dtype).reshape(logit_scale.shape)


# ---------------------------------------------------------------------------------------------
# the baseline attentions, forward only (see `_library.ForwardOnlyOp` for the contract); a 2-D
# grid (batch * heads or batch * value blocks, query tiles)
# ---------------------------------------------------------------------------------------------

SELF_CORRELATION_WHAT = "triton self-correlation of x {}"
AFFINITY_WHAT = "triton masked affinity attention of f {} and v {}"


def _grid_2d(units: int, length: int, block: int, what: str, *tensors: Tensor) -> tuple[int, int]:
    tiles = (length + block - 1) // block
    if units > MAX_PROGRAMS or tiles > 65535:
        raise ValueError(f"{what.format(*(tuple(t.shape) for t in tensors))} needs a launch grid "
                         f"of {units} x {tiles} programs, expected at most {MAX_PROGRAMS} x 65535 "
                         "(CUDA's limits)")
    return units, tiles


def _launch_self_corr(x, y, v, out, scale, bias_coef, grid_w, first, launch, warmup=False):
    B, H, N, _ = x.shape
    _kernels().baselines.self_corr_fwd.run(
        x, y, v, out, scale, bias_coef, *x.stride(), *y.stride(), *v.stride(), *out.stride(),
        H, N, grid_w, first,
        grid=_grid_2d(B * H, N, launch["BLOCK_M"], SELF_CORRELATION_WHAT, x), warmup=warmup,
        **launch.kwargs)


def _self_correlation(x: Tensor, x2: Tensor | None, v: Tensor, out: Tensor, scale: float,
                      grid: tuple[int, bool, float] | None) -> None:
    """softmax(s x x^T [+ G]) v, or with x2 SCLIP's sum; grid = (width, class_token, sigma)."""
    ks = _kernels()
    B, H, N, d = x.shape
    grid_w, class_token, sigma = grid or (1, False, 1.0)
    bias_coef = -math.log2(math.e) / (2.0 * sigma * sigma)
    y = x if x2 is None else x2
    precision = ks.common.dot_precision(x.dtype)
    dual, bias = x2 is not None, grid is not None
    key = (x.dtype, d, ks.tuning.bucket(N), ks.tuning.bucket(B * H, 1, 1024), precision, dual, bias,
           x.get_device())
    launch = ks.self_corr_fwd.best.get(key)
    run = functools.partial(_launch_self_corr, x, y, v, out, scale, bias_coef, grid_w, int(class_token))
    with _on_device(x):
        if launch is None:
            constexprs = {**attention_constexprs(x, precision), "DUAL": dual, "BIAS": bias}
            launch = _tune(ks.self_corr_fwd, key, constexprs, ks.baselines.self_corr_configs,
                           (_kind(x.dtype, precision),), ks.baselines.INTERPRET_SELF_CORR, x.device,
                           run)
        run(launch)


def self_correlation_forward(x: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    _self_correlation(x, None, v, out, scale, None)


def self_correlation_sum_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    _self_correlation(q, k, v, out, scale, None)


def gaussian_self_correlation_forward(x: Tensor, v: Tensor, scale: float, grid_h: int, grid_w: int,
                                      sigma: float, class_token: bool, out: Tensor) -> None:
    _self_correlation(x, None, v, out, scale, (grid_w, class_token, sigma))


def _launch_affinity(f, rnorm, thresh, v, out, gamma, launch, warmup=False):
    B, n, C = f.shape
    H, d = v.shape[1], v.shape[3]
    value_blocks = triton.cdiv(H * d, launch["BLOCK_DV"])
    _kernels().baselines.masked_affinity_fwd.run(
        f, rnorm, thresh, v, out, gamma,
        *f.stride(), *rnorm.stride(), *v.stride(), *out.stride(), n, C, H,
        grid=_grid_2d(B * value_blocks, n, launch["BLOCK_M"], AFFINITY_WHAT, f, v), warmup=warmup,
        **launch.kwargs)


def masked_affinity_forward(f: Tensor, v: Tensor, beta: float, gamma: float, out: Tensor) -> None:
    ks = _kernels()
    B, n, C = f.shape
    H, d = v.shape[1], v.shape[3]
    rnorm, thresh = affinity_first_pass(f, beta)
    precision = ks.common.dot_precision(f.dtype)
    key = (f.dtype, d, H, C, ks.tuning.bucket(n), ks.tuning.bucket(B, 1, 1024), precision,
           f.get_device())
    launch = ks.masked_affinity_fwd.best.get(key)
    run = functools.partial(_launch_affinity, f, rnorm, thresh, v, out, gamma)
    with _on_device(f):
        if launch is None:
            constexprs = {"HEAD_DIM": d, "ACC_DTYPE": ks.common.acc_dtype(f.dtype),
                          "DOT_PRECISION": precision}
            launch = _tune(ks.masked_affinity_fwd, key, constexprs, ks.baselines.affinity_configs,
                           (_kind(f.dtype, precision),), ks.baselines.INTERPRET_AFFINITY, f.device,
                           run)
        run(launch)


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
