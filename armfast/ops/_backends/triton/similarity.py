"""Launchers of SC-CLIP's similarity kernels (`armfast.kernels.similarity_attention`), forward
only: the thresholded similarity aggregation and the averaged dual softmax, both on a 2-D grid
(batch * value blocks or batch * heads, query tiles) after the O(N C) first pass of
`_affinity.first_pass` (inverse row norms, and for the dual softmax beta * mean(S))."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import triton
from torch import Tensor

from ... import _affinity
from ..._library import empty, lse_dtype
from ._launch import attention_constexprs, grid_2d, kind, on_device, shared, tune


@functools.cache
def kernels():
    """The similarity kernel module and its tuners, made at the first launch (`_launch`)."""
    from armfast.kernels import similarity_attention as similarity
    tuner = shared().tuning.Tuner
    return SimpleNamespace(module=similarity,
                           aggregation=tuner("similarity_aggregation_fwd",
                                             similarity.similarity_aggregation_fwd),
                           dual=tuner("averaged_dual_softmax_fwd",
                                      similarity.averaged_dual_softmax_fwd))


AGGREGATION_WHAT = "triton similarity aggregation of f {} and x {}"
DUAL_WHAT = "triton averaged dual softmax of f {} and k {}"


def s_precision(dtype: torch.dtype, precision: str) -> str:
    """Input precision of the products that give S: IEEE float32, or 3xTF32 where torch allows
    TF32 (as accurate as float32 for these decisions, never plain TF32); half precision is exact
    in the float32 accumulator anyway."""
    return "tf32x3" if dtype == torch.float32 and precision == "tf32" else "ieee"


def _launch_aggregation(f, rnorm, x, out, rowsum, threshold, launch, warmup=False):
    B, N, C = f.shape
    D = x.shape[2]
    value_blocks = triton.cdiv(D, launch["BLOCK_DV"])
    kernels().module.similarity_aggregation_fwd.run(
        f, rnorm, x, out, rowsum, threshold,
        *f.stride(), *rnorm.stride(), *x.stride(), *out.stride(), N, C, D,
        grid=grid_2d(B * value_blocks, N, launch["BLOCK_M"], AGGREGATION_WHAT, f, x),
        warmup=warmup, **launch.kwargs)


def similarity_aggregation_forward(f: Tensor, x: Tensor, threshold: float, out: Tensor) -> Tensor:
    """Writes W x / (rowsum(W) + 1e-6) into `out` [B, N, D] (any strides); returns the saved
    statistic rowsum(W) [B, N] (float32; float64 for float64 features), which the op drops."""
    ks, common, bucket = kernels(), shared().common, shared().tuning.bucket
    B, N, C = f.shape
    rnorm, _ = _affinity.first_pass(f, 0.0)
    rowsum = empty((B, N), lse_dtype(f.dtype), f.device)
    precision = common.dot_precision(x.dtype)
    key = (f.dtype, x.dtype, bucket(C), bucket(x.shape[2]), bucket(N), bucket(B, 1, 1024),
           precision, f.get_device())
    launch = ks.aggregation.best.get(key)
    run = functools.partial(_launch_aggregation, f, rnorm, x, out, rowsum, float(threshold))
    with on_device(f):
        if launch is None:
            constexprs = {"ACC_DTYPE": common.acc_dtype(f.dtype), "DOT_PRECISION": precision,
                          "S_PRECISION": s_precision(f.dtype, precision)}
            launch = tune(ks.aggregation, key, constexprs, ks.module.aggregation_configs,
                          (kind(x.dtype, precision),), ks.module.INTERPRET_AGGREGATION, f.device,
                          run)
        run(launch)
    return rowsum


def _launch_dual(f, rnorm, thresh, k, v, out, lse_mask, lse_kk, scale, gamma, launch,
                 warmup=False):
    B, H, N, _ = k.shape
    kernels().module.averaged_dual_softmax_fwd.run(
        f, rnorm, thresh, k, v, out, lse_mask, lse_kk, scale, gamma,
        *f.stride(), *rnorm.stride(), *k.stride(), *v.stride(), *out.stride(), H, N, f.shape[2],
        grid=grid_2d(B * H, N, launch["BLOCK_M"], DUAL_WHAT, f, k), warmup=warmup,
        **launch.kwargs)


def averaged_dual_softmax_forward(f: Tensor, k: Tensor, v: Tensor, scale: float, beta: float,
                                  gamma: float, out: Tensor) -> tuple[Tensor, Tensor]:
    """Writes ((P_mask + softmax(scale k k^T)) / 2) v into `out` [B, H, N, d] (any strides);
    returns the saved statistics, the two softmaxes' row log-sum-exps [B, H, N] (P_mask's, then
    k-k's), which the op drops."""
    ks, common, bucket = kernels(), shared().common, shared().tuning.bucket
    B, H, N, d = k.shape
    rnorm, thresh = _affinity.first_pass(f, beta)
    lse_mask = empty((B, H, N), lse_dtype(k.dtype), k.device)
    lse_kk = empty((B, H, N), lse_dtype(k.dtype), k.device)
    precision = common.dot_precision(k.dtype)
    key = (f.dtype, k.dtype, d, bucket(f.shape[2]), bucket(N), bucket(B * H, 1, 1024), precision,
           f.get_device())
    launch = ks.dual.best.get(key)
    run = functools.partial(_launch_dual, f, rnorm, thresh, k, v, out, lse_mask, lse_kk,
                            float(scale), float(gamma))
    with on_device(f):
        if launch is None:
            constexprs = {**attention_constexprs(k, precision),
                          "S_PRECISION": s_precision(f.dtype, common.dot_precision(f.dtype))}
            launch = tune(ks.dual, key, constexprs, ks.module.dual_configs,
                          (kind(k.dtype, precision), constexprs["BLOCK_D"]), ks.module.INTERPRET_DUAL, f.device, run)
        run(launch)
    return lse_mask, lse_kk
