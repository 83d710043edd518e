"""Launchers of the attention kernels (`armfast.kernels.attention`): the forward (plain, or
with Hopper's TMA descriptors for large calls), the backward (dK, dV and, on the atomic path,
dQ in one pass; a separate dQ kernel when torch asks for deterministic algorithms).

A call costs host time that a microsecond kernel cannot hide, so the launch path does little:
one tuple key and one dict lookup for the chosen config (`kernels/_tuning.py`: chosen once per
size bucket, remembered on disk), the flat grid from one division, and `JITFunction.run` with
the config's keyword arguments prepared when it was chosen. Nothing is rebuilt per call.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import Tensor

try:  # Hopper's TMA tensor descriptors, as Triton >= 3.4 offers them from the host
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from ..._library import empty, lse_dtype
from ._launch import attention_constexprs, block_d, flat_grid, kind, on_device, shared, tune

# From this many query rows (B * H * N_Q) on, TMA configs join the forward's candidates. Below,
# a forward takes microseconds on the GPU and its four descriptors per call would cost more host
# time than they can save.
TMA_MIN_ROWS = 1 << 16


@functools.cache
def kernels() -> SimpleNamespace:
    """The attention kernel module and its tuners, made at the first launch (`_launch`)."""
    from armfast.kernels import attention
    tuner = shared().tuning.Tuner
    return SimpleNamespace(module=attention, fwd=tuner("attn_fwd", attention.attn_fwd),
                           bwd=tuner("attn_bwd", attention.attn_bwd_preprocess, attention.attn_bwd),
                           bwd_dq=tuner("attn_bwd_dq", attention.attn_bwd_dq))


def _attention_key(q: Tensor, N_K: int, precision: str, *extra) -> tuple:
    B, H, N_Q, d = q.shape
    bucket = shared().tuning.bucket
    return (q.dtype, d, bucket(N_Q), bucket(N_K), bucket(B * H, 1, 1024), precision, *extra,
            q.get_device())


def _attention_tune(tuner, key, q: Tensor, precision: str, configs, run, **extra):
    constexprs = attention_constexprs(q, precision, **extra)
    return tune(tuner, key, constexprs, configs,
                (kind(q.dtype, precision), constexprs["BLOCK_D"]),
                kernels().module.INTERPRET_CONFIG, q.device, run)


def _tma_ready(*tensors: Tensor) -> bool:
    """Whether TMA descriptors can describe these [B, H, N, d] tensors: d a power of two in
    [16, 128] (one tile spans the head dim), a contiguous last dimension, 16-byte aligned base
    and strides."""
    if TensorDescriptor is None or tensors[0].shape[3] != block_d(tensors[0].shape[3]):
        return False
    for t in tensors:
        size, strides = t.element_size(), t.stride()
        if strides[3] != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in strides[:3]):
            return False
    return True


def _fwd_configs(family: str, kind: str, block_d: int, tma: bool) -> list:
    attention = kernels().module
    return attention.fwd_configs(family, kind, block_d) + (
        attention.fwd_tma_configs(family, kind, block_d) if tma else [])


def _descriptor(t: Tensor, rows: int):
    return TensorDescriptor(t, t.shape, t.stride(), [1, 1, rows, t.shape[3]])


ATTENTION = "triton attention of q {}"
ATTENTION_BWD = "triton attention backward of q {} and k {}"


def _launch_fwd(q, k, v, out, lse, scale, launch, warmup=False):
    B, H, N_Q, _ = q.shape
    if launch.variant == "tma":
        block_m, block_n = launch["BLOCK_M"], launch["BLOCK_N"]
        return kernels().module.attn_fwd_tma.run(
            _descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n),
            _descriptor(out, block_m), lse, scale, H, N_Q, k.shape[2],
            grid=flat_grid(B * H, N_Q, block_m, ATTENTION, q), warmup=warmup, **launch.kwargs)
    return kernels().module.attn_fwd.run(
        q, k, v, out, lse, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N_Q, k.shape[2],
        grid=flat_grid(B * H, N_Q, launch["BLOCK_M"], ATTENTION, q), warmup=warmup,
        **launch.kwargs)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> Tensor:
    """Writes softmax(q k^T * scale) v into `out` (any strides); returns the row lse."""
    ks = kernels()
    B, H, N_Q, _ = q.shape
    lse = empty((B, H, N_Q), lse_dtype(q.dtype), q.device)
    precision = shared().common.dot_precision(q.dtype)
    tma = B * H * N_Q >= TMA_MIN_ROWS and _tma_ready(q, k, v, out)
    key = _attention_key(q, k.shape[2], precision, tma)
    launch = ks.fwd.best.get(key)
    with on_device(q):
        if launch is None:
            launch = _attention_tune(ks.fwd, key, q, precision,
                                     functools.partial(_fwd_configs, tma=tma),
                                     functools.partial(_launch_fwd, q, k, v, out, lse, scale))
        _launch_fwd(q, k, v, out, lse, scale, launch)
    return lse


def _launch_bwd(dout, q, k, v, lse, delta, dk, dv, dq_acc, out, scale, launch, warmup=False):
    """On the atomic path delta and dq_acc = 0 first (one preprocess launch); then dK, dV (and
    dQ) in one pass. The deterministic path's dQ kernel has written delta already."""
    ks = kernels().module
    B, H, N_Q, d = q.shape
    N_K = k.shape[2]
    if launch["DQ_ATOMIC"]:
        ks.attn_bwd_preprocess.run(
            out, dout, delta, dq_acc, *out.stride(), *dout.stride(), H, N_Q,
            grid=flat_grid(B * H, N_Q, ks.BLOCK_M_PREPROCESS, ATTENTION_BWD, q, k),
            warmup=warmup, HEAD_DIM=d, BLOCK_D=launch["BLOCK_D"], ACC_DTYPE=launch["ACC_DTYPE"],
            BLOCK_M=ks.BLOCK_M_PREPROCESS)
    ks.attn_bwd.run(
        q, k, v, dout, lse, delta, dk, dv, dq_acc, scale,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), H, N_Q, N_K,
        grid=flat_grid(B * H, N_K, launch["BLOCK_N"], ATTENTION_BWD, q, k),
        warmup=warmup, **launch.kwargs)


def _launch_bwd_dq(dout, q, k, v, out, lse, delta, dq, scale, launch, warmup=False):
    """dQ, and delta for the dK, dV kernel that follows."""
    B, H, N_Q, _ = q.shape
    kernels().module.attn_bwd_dq.run(
        q, k, v, out, dout, lse, delta, dq, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride(),
        H, N_Q, k.shape[2],
        grid=flat_grid(B * H, N_Q, launch["BLOCK_M"], ATTENTION_BWD, q, k),
        warmup=warmup, **launch.kwargs)


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv. dQ is summed with float32 atomics, or, when
    `torch.use_deterministic_algorithms(True)` is on, by a separate kernel (bit-reproducible)."""
    ks = kernels()
    B, H, N_Q, _ = q.shape
    lse = lse.contiguous()  # the kernels index it flat (it is, as the forward made it)
    acc_dtype = lse_dtype(q.dtype)  # float32, float64 for float64 inputs
    deterministic = torch.are_deterministic_algorithms_enabled()
    precision = shared().common.dot_precision(q.dtype)
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
    launch = ks.bwd.best.get(key)
    with on_device(q):
        if deterministic:  # dQ (and delta) first: two launches, no preprocess
            dq_launch = ks.bwd_dq.best.get(key)
            if dq_launch is None:
                dq_launch = _attention_tune(ks.bwd_dq, key, q, precision,
                                            ks.module.bwd_dq_configs,
                                            functools.partial(_launch_bwd_dq, dout, q, k, v,
                                                              out, lse, delta, dq, scale))
            _launch_bwd_dq(dout, q, k, v, out, lse, delta, dq, scale, dq_launch)
        if launch is None:
            launch = _attention_tune(ks.bwd, key, q, precision, ks.module.bwd_configs,
                                     functools.partial(_launch_bwd, dout, q, k, v, lse, delta,
                                                       dk, dv, dq_acc, out, scale),
                                     DQ_ATOMIC=not deterministic)
        _launch_bwd(dout, q, k, v, lse, delta, dk, dv, dq_acc, out, scale, launch)
        if separate_acc:
            dq.copy_(dq_acc)
    return dq, dk, dv
