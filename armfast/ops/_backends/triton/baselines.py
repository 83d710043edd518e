"""Launchers of the baseline attentions' kernels (`armfast.kernels.baseline_attention`), forward
only (see `armfast.ops._library.ForwardOnlyOp` for the contract): the self-correlations of
ClearCLIP, SCLIP and NACLIP on one kernel, ProxyCLIP's masked affinity attention on another; a
2-D grid (batch * heads or batch * value blocks, query tiles)."""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import triton
from torch import Tensor

from ... import _affinity
from ._launch import attention_constexprs, grid_2d, kind, on_device, shared, tune


@functools.cache
def kernels() -> SimpleNamespace:
    """The baseline kernel module and its tuners, made at the first launch (`_launch`)."""
    from armfast.kernels import baseline_attention as baselines
    tuner = shared().tuning.Tuner
    return SimpleNamespace(module=baselines,
                           self_corr=tuner("self_corr_fwd", baselines.self_corr_fwd),
                           affinity=tuner("masked_affinity_fwd", baselines.masked_affinity_fwd))


SELF_CORRELATION_WHAT = "triton self-correlation of x {}"
AFFINITY_WHAT = "triton masked affinity attention of f {} and v {}"


def _launch_self_corr(x, y, v, out, scale, bias_coef, grid_w, first, launch, warmup=False):
    B, H, N, _ = x.shape
    kernels().module.self_corr_fwd.run(
        x, y, v, out, scale, bias_coef, *x.stride(), *y.stride(), *v.stride(), *out.stride(),
        H, N, grid_w, first,
        grid=grid_2d(B * H, N, launch["BLOCK_M"], SELF_CORRELATION_WHAT, x), warmup=warmup,
        **launch.kwargs)


def _self_correlation(x: Tensor, x2: Tensor | None, v: Tensor, out: Tensor, scale: float,
                      grid: tuple[int, bool, float] | None) -> None:
    """softmax(s x x^T [+ G]) v, or with x2 SCLIP's sum; grid = (width, class_token, sigma)."""
    ks, common, bucket = kernels(), shared().common, shared().tuning.bucket
    B, H, N, d = x.shape
    grid_w, class_token, sigma = grid or (1, False, 1.0)
    bias_coef = -math.log2(math.e) / (2.0 * sigma * sigma)
    y = x if x2 is None else x2
    precision = common.dot_precision(x.dtype)
    dual, bias = x2 is not None, grid is not None
    key = (x.dtype, d, bucket(N), bucket(B * H, 1, 1024), precision, dual, bias,
           x.get_device())
    launch = ks.self_corr.best.get(key)
    run = functools.partial(_launch_self_corr, x, y, v, out, scale, bias_coef, grid_w, int(class_token))
    with on_device(x):
        if launch is None:
            constexprs = {**attention_constexprs(x, precision), "DUAL": dual, "BIAS": bias}
            launch = tune(ks.self_corr, key, constexprs, ks.module.self_corr_configs,
                          (kind(x.dtype, precision),), ks.module.INTERPRET_SELF_CORR, x.device,
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
    kernels().module.masked_affinity_fwd.run(
        f, rnorm, thresh, v, out, gamma,
        *f.stride(), *rnorm.stride(), *v.stride(), *out.stride(), n, C, H,
        grid=grid_2d(B * value_blocks, n, launch["BLOCK_M"], AFFINITY_WHAT, f, v), warmup=warmup,
        **launch.kwargs)


def masked_affinity_forward(f: Tensor, v: Tensor, beta: float, gamma: float, out: Tensor) -> None:
    ks, common, bucket = kernels(), shared().common, shared().tuning.bucket
    B, n, C = f.shape
    H, d = v.shape[1], v.shape[3]
    rnorm, thresh = _affinity.first_pass(f, beta)
    precision = common.dot_precision(f.dtype)
    key = (f.dtype, d, H, C, bucket(n), bucket(B, 1, 1024), precision,
           f.get_device())
    launch = ks.affinity.best.get(key)
    run = functools.partial(_launch_affinity, f, rnorm, thresh, v, out, gamma)
    with on_device(f):
        if launch is None:
            constexprs = {"HEAD_DIM": d, "ACC_DTYPE": common.acc_dtype(f.dtype),
                          "DOT_PRECISION": precision}
            launch = tune(ks.affinity, key, constexprs, ks.module.affinity_configs,
                          (kind(f.dtype, precision),), ks.module.INTERPRET_AFFINITY, f.device,
                          run)
        run(launch)
