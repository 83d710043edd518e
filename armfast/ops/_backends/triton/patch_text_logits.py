"""Launchers of the fused cosine-logits kernels (`armfast.kernels.patch_text_logits`): the
forward, and the backward as row norms, dout * cos per tile, then dx and (unless the class
embeddings are frozen) dtext; x [B, N, E] is launched as R = B * N rows, text [C, E] as
[1, C, E]."""
from __future__ import annotations

import functools
from types import SimpleNamespace

from torch import Tensor

from ..._library import empty, lse_dtype
from ._launch import flat_grid, kind, on_device, shared, tune

LOGITS = "triton patch_text_logits of x {} and text {}"


@functools.cache
def kernels() -> SimpleNamespace:
    """The logits kernel module and its tuners, made at the first launch (`_launch`)."""
    from armfast.kernels import patch_text_logits as logits
    tuner = shared().tuning.Tuner
    return SimpleNamespace(module=logits, fwd=tuner("ptl_fwd", logits.ptl_fwd),
                           gcos=tuner("ptl_bwd_gcos", logits.ptl_bwd_gcos),
                           dx=tuner("ptl_bwd_dx", logits.ptl_bwd_dx),
                           dtext=tuner("ptl_bwd_dtext", logits.ptl_bwd_dtext))


def _logits_key(x: Tensor, C: int, precision: str) -> tuple:
    B, N, E = x.shape
    bucket = shared().tuning.bucket
    return (x.dtype, bucket(E), bucket(C), bucket(B * N), precision, x.get_device())


def _logits_tune(tuner, key, x: Tensor, precision: str, configs, run):
    constexprs = {"ACC_DTYPE": shared().common.acc_dtype(x.dtype), "DOT_PRECISION": precision}
    return tune(tuner, key, constexprs, configs, (kind(x.dtype, precision),),
                kernels().module.INTERPRET_CONFIG, x.device, run)


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
    kernels().module.ptl_fwd.run(
        x, text, logit_scale, out, *x_strides, *text.stride(), *out_strides, B * N, per_batch, C,
        E, grid=_tiles(B * N, C, launch, x, text), warmup=warmup, **launch.kwargs)


def patch_text_logits_forward(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    ks = kernels()
    B, N, _ = x.shape
    C = text.shape[0]
    out = empty((B, N, C), x.dtype, x.device)
    precision = shared().common.dot_precision(x.dtype)
    key = _logits_key(x, C, precision)
    launch = ks.fwd.best.get(key)
    with on_device(x):
        if launch is None:
            launch = _logits_tune(ks.fwd, key, x, precision, ks.module.fwd_configs,
                                  functools.partial(_launch_ptl_fwd, x, text, logit_scale, out))
        _launch_ptl_fwd(x, text, logit_scale, out, launch)
    return out


def _launch_ptl_gcos(x, text, dout, gcos, launch, warmup=False):
    B, N, E = x.shape
    C = text.shape[0]
    per_batch, (x_strides, g_strides) = _as_rows(N, x, dout)
    kernels().module.ptl_bwd_gcos.run(
        x, text, dout, gcos, *x_strides, *text.stride(), *g_strides, B * N, per_batch, C, E,
        grid=_tiles(B * N, C, launch, x, text), warmup=warmup, **launch.kwargs)


def _launch_ptl_dx(x, text, dout, logit_scale, x_norm, t_norm, gc_row, dx, launch, warmup=False):
    B, N, E = x.shape
    per_batch, (x_strides, g_strides, dx_strides) = _as_rows(N, x, dout, dx)
    kernels().module.ptl_bwd_dx.run(
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
    kernels().module.ptl_bwd_dtext.run(
        x, text, dout, logit_scale, x_norm, t_norm, gc_col, dtext,
        *x_strides, *text.stride(), *g_strides, *dtext.stride(), B * N, per_batch, C, E,
        grid=flat_grid((C + launch["BLOCK_C"] - 1) // launch["BLOCK_C"], E, launch["BLOCK_E"],
                       LOGITS, x, text),
        warmup=warmup, **launch.kwargs)


def patch_text_logits_backward(dout: Tensor, x: Tensor, text: Tensor, logit_scale: Tensor,
                               text_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dtext (None without `text_grad`: frozen class embeddings skip that pass) and
    dlogit_scale."""
    ks = kernels()
    logits = ks.module
    B, N, E = x.shape
    C, R = text.shape[0], B * N
    common = shared().common
    precision = common.dot_precision(x.dtype)
    acc = common.acc_dtype(x.dtype)
    norm_dtype = lse_dtype(x.dtype)  # float32, float64 for float64 inputs
    x_norm = empty((R,), norm_dtype, x.device)
    t_norm = empty((C,), norm_dtype, x.device)
    gcos = empty((R, C), norm_dtype, x.device)  # dout * cos, reduced below in a fixed order
    dx = empty(x.shape, x.dtype, x.device)
    key = _logits_key(x, C, precision)
    block_r, block_e = logits.ROW_NORM_BLOCK_R, logits.ROW_NORM_BLOCK_E
    rows_per_batch, (x_strides,) = _as_rows(N, x)

    with on_device(x):
        logits.row_norm.run(x, x_norm, *x_strides, R, rows_per_batch, E,
                            grid=flat_grid(1, R, block_r, LOGITS, x, text), warmup=False,
                            ACC_DTYPE=acc, BLOCK_R=block_r, BLOCK_E=block_e)
        logits.row_norm.run(text, t_norm, 0, *text.stride(), C, C, E,
                            grid=flat_grid(1, C, block_r, LOGITS, x, text), warmup=False,
                            ACC_DTYPE=acc, BLOCK_R=block_r, BLOCK_E=block_e)
        launch = ks.gcos.best.get(key)
        if launch is None:
            launch = _logits_tune(ks.gcos, key, x, precision, logits.fwd_configs,
                                  functools.partial(_launch_ptl_gcos, x, text, dout, gcos))
        _launch_ptl_gcos(x, text, dout, gcos, launch)
        gc_row = gcos.sum(1)  # sum_c dout * cos, per row
        dscale = gc_row.sum()
        launch = ks.dx.best.get(key)
        if launch is None:
            launch = _logits_tune(ks.dx, key, x, precision, logits.dx_configs,
                                  functools.partial(_launch_ptl_dx, x, text, dout, logit_scale,
                                                    x_norm, t_norm, gc_row, dx))
        _launch_ptl_dx(x, text, dout, logit_scale, x_norm, t_norm, gc_row, dx, launch)
        if not text_grad:
            return dx, None, dscale.to(logit_scale.dtype).reshape(logit_scale.shape)
        gc_col = gcos.sum(0)  # sum over rows, per text row
        dtext = empty(text.shape, text.dtype, text.device)
        launch = ks.dtext.best.get(key)
        if launch is None:
            launch = _logits_tune(ks.dtext, key, x, precision, logits.dtext_configs,
                                  functools.partial(_launch_ptl_dtext, x, text, dout,
                                                    logit_scale, x_norm, t_norm, gc_col, dtext))
        _launch_ptl_dtext(x, text, dout, logit_scale, x_norm, t_norm, gc_col, dtext, launch)
    return dx, dtext, dscale.to(logit_scale.dtype).reshape(logit_scale.shape)
