"""The Triton kernels of SC-CLIP's similarity ops (kernels/similarity_attention.py) through their
launchers (outputs and saved statistics) and through the op layer (backend="triton", gradients,
torch.compile), against float64 formulas: awkward lengths, strided inputs, thresholds placed between
two cosines a few 1e-5 apart. Without a GPU they run under the interpreter (float32, float64); half
precision is marked gpu. Everything is made on DEVICE: the same tests run on a GPU."""
from __future__ import annotations

import pytest
import torch

from armfast import ops
from helpers.internals import triton_backend
from helpers.sc_clip_math import cosines_f64, dual_softmax_f64, similarity_f64
from helpers.similarity_math import (count_near, features, near_threshold_aggregation,
                                     near_threshold_dual, values)
from helpers.tensors import AWKWARD_N, DEVICE, assert_close

TOL = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float64: dict(atol=1e-6, rtol=1e-6),
       torch.float16: dict(atol=3e-3, rtol=1e-2), torch.bfloat16: dict(atol=2e-2, rtol=3e-2)}
DTYPES = (torch.float32, pytest.param(torch.float64, marks=pytest.mark.interpreter_only))
HALF = [pytest.param(dt, marks=pytest.mark.gpu) for dt in (torch.float16, torch.bfloat16)]


def _launchers():
    return triton_backend.similarity


def aggregation(f, x, threshold):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    rowsum = _launchers().similarity_aggregation_forward(f, x, threshold, out)
    return out, rowsum


def dual(f, k, v, scale=None, gamma=3.0, beta=1.0):
    out = torch.full(v.shape, float("nan"), dtype=v.dtype, device=v.device)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    lse = _launchers().averaged_dual_softmax_forward(f, k, v, scale, beta, gamma, out)
    return out, lse


def _sizes(N):
    """(C, D) per length: the longest lengths take narrow features to keep the interpreter fast."""
    return (24, 40) if N > 400 else (48, 72)


@pytest.mark.parametrize("N", AWKWARD_N)
def test_aggregation_matches_float64(N):
    g = torch.Generator().manual_seed(N)
    C, D = _sizes(N)
    f = features(2, N, C, strided=True, generator=g).to(DEVICE)
    x = values((2, N, D), strided=True, generator=g).to(DEVICE)
    out, rowsum = aggregation(f, x, 0.4)
    assert_close(out, similarity_f64(f, x, 0.4), **TOL[torch.float32], name="out")
    S = cosines_f64(f)
    assert_close(rowsum, (S * (S >= 0.4)).sum(-1), **TOL[torch.float32], name="rowsum")


@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregation_near_threshold(dtype):
    g = torch.Generator().manual_seed(11)
    f, threshold = near_threshold_aggregation(2, 97, 16, dtype=dtype, generator=g)
    below, above = count_near(cosines_f64(f), threshold)
    assert below > 0 and above > 0  # the case is built near the threshold
    f = f.to(DEVICE)
    x = values((2, 97, 33), dtype=dtype, generator=g).to(DEVICE)
    out, _ = aggregation(f, x, threshold)
    assert out.dtype == dtype
    assert_close(out, similarity_f64(f, x, threshold), **TOL[dtype], name=str(dtype))


@pytest.mark.parametrize("N", AWKWARD_N)
def test_dual_softmax_matches_float64(N):
    g = torch.Generator().manual_seed(N + 1)
    C = 24 if N > 400 else 48
    H, d = (1, 32) if N > 400 else (2, 64)
    f = features(2, N, C, strided=True, generator=g).to(DEVICE)
    qkv = values((2, N, 3 * H * d), generator=g).view(2, N, 3, H, d).permute(2, 0, 3, 1, 4)
    k, v = qkv[1].to(DEVICE), qkv[2].to(DEVICE)  # [B, H, N, d] views of a fused projection
    assert N == 1 or not k.is_contiguous()
    out, (lse_mask, lse_kk) = dual(f, k, v, gamma=3.0, beta=1.0)
    assert_close(out, dual_softmax_f64(f, k, v), **TOL[torch.float32], name="out")
    kd = k.double()
    want_kk = torch.logsumexp(kd @ kd.transpose(-1, -2) * d ** -0.5, -1)
    assert_close(lse_kk, want_kk, **TOL[torch.float32], name="lse_kk")
    S = cosines_f64(f)
    A = 3.0 * (S - S.mean(dim=(1, 2), keepdim=True))
    A = A.masked_fill((A < 0) & ~torch.eye(N, dtype=torch.bool, device=A.device), float("-inf"))
    assert_close(lse_mask, torch.logsumexp(A, -1).unsqueeze(1).expand(-1, H, -1),
                 **TOL[torch.float32], name="lse_mask")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dual_softmax_near_threshold_and_parameters(dtype):
    g = torch.Generator().manual_seed(12)
    f, beta = near_threshold_dual(2, 83, 16, dtype=dtype, generator=g)
    S = cosines_f64(f)
    below, above = count_near(S, beta * float(S.mean()))
    assert below > 0 and above > 0
    k, v = (values((2, 3, 83, 40), dtype=dtype, generator=g).to(DEVICE) for _ in range(2))
    f = f.to(DEVICE)
    out, _ = dual(f, k, v, scale=0.3, gamma=2.5, beta=beta)
    assert out.dtype == dtype
    assert_close(out, dual_softmax_f64(f, k, v, scale=0.3, gamma=2.5, beta=beta),
                 **TOL[dtype], name=str(dtype))


def test_tf32_matmuls_keep_the_decisions_in_float32():
    """With TF32 allowed for float32 matmuls, S still decides in float32 (3xTF32 on a GPU): the
    near-threshold cases agree with float64 (the products with x and v may use TF32)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        g = torch.Generator().manual_seed(14)
        f, threshold = near_threshold_aggregation(2, 97, 64, generator=g)
        x = values((2, 97, 33), generator=g)
        fd, beta = near_threshold_dual(2, 97, 64, generator=g)
        k, v = (values((2, 2, 97, 32), generator=g) for _ in range(2))
        f, x, fd, k, v = (t.to(DEVICE) for t in (f, x, fd, k, v))
        out, _ = aggregation(f, x, threshold)
        tol = dict(atol=3e-3, rtol=3e-3)  # TF32 products with x and v on a GPU
        assert_close(out, similarity_f64(f, x, threshold), **tol, name="aggregation")
        out, _ = dual(fd, k, v, beta=beta)
        assert_close(out, dual_softmax_f64(fd, k, v, beta=beta), **tol, name="dual")
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_on_gpu(dtype):
    g = torch.Generator().manual_seed(13)
    f, threshold = near_threshold_aggregation(2, 197, 768, dtype=dtype, generator=g)
    f = f.to(DEVICE)
    x = values((2, 197, 768), dtype=dtype, generator=g).to(DEVICE)
    out, _ = aggregation(f, x, threshold)
    assert_close(out, similarity_f64(f, x, threshold), **TOL[dtype], name="aggregation")
    f, beta = near_threshold_dual(2, 197, 768, dtype=dtype, generator=g)
    f = f.to(DEVICE)
    k, v = (values((2, 12, 197, 64), dtype=dtype, generator=g).to(DEVICE) for _ in range(2))
    out, _ = dual(f, k, v, beta=beta)
    assert_close(out, dual_softmax_f64(f, k, v, beta=beta), **TOL[dtype], name="dual")


# ---- through the op layer: ops.<op>(..., backend="triton"), its gradients and torch.compile -----

def _op_inputs(dtype=torch.float32, seed=21):
    g = torch.Generator().manual_seed(seed)
    f, threshold = near_threshold_aggregation(2, 45, 16, dtype=dtype, generator=g)
    x = values((2, 45, 24), dtype=dtype, strided=True, generator=g)
    fd, beta = near_threshold_dual(2, 45, 16, dtype=dtype, generator=g)
    k, v = (values((2, 2, 45, 32), dtype=dtype, generator=g) for _ in range(2))
    return [t.to(DEVICE) for t in (f, x, fd, k, v)], threshold, beta


def test_ops_run_on_triton_and_match_float64():
    (f, x, fd, k, v), threshold, beta = _op_inputs()
    assert ops.explain(ops.similarity_aggregation, f, x, threshold=threshold,
                       backend="triton").backend == "triton"
    got = ops.similarity_aggregation(f, x, threshold=threshold, backend="triton")
    assert_close(got, similarity_f64(f, x, threshold), **TOL[torch.float32],
                 name="similarity_aggregation")
    got = ops.averaged_dual_softmax(fd, k, v, beta=beta, scale=0.2, backend="triton")
    assert_close(got, dual_softmax_f64(fd, k, v, scale=0.2, beta=beta),
                 **TOL[torch.float32], name="averaged_dual_softmax")


def test_ops_gradients_recompute_the_reference():
    (f, x, fd, k, v), threshold, beta = _op_inputs(seed=22)
    x, k, v = (t.detach().requires_grad_() for t in (x, k, v))
    out = ops.similarity_aggregation(f, x, threshold=threshold, backend="triton")
    dual_out = ops.averaged_dual_softmax(fd, k, v, beta=beta, backend="triton")
    (out.square().sum() + dual_out.square().sum()).backward()
    xr, kr, vr = (t.detach().double().requires_grad_() for t in (x, k, v))
    (similarity_f64(f, xr, threshold).square().sum()
     + dual_softmax_f64(fd, kr, vr, beta=beta).square().sum()).backward()
    for name, got, want in (("dx", x.grad, xr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
        assert_close(got, want, atol=1e-4, rtol=1e-3, name=name)


def test_ops_compile_fullgraph_on_triton():
    (f, x, fd, k, v), threshold, beta = _op_inputs(seed=23)

    def fn(f, x, fd, k, v):
        return (ops.similarity_aggregation(f, x, threshold=threshold, backend="triton"),
                ops.averaged_dual_softmax(fd, k, v, beta=beta, backend="triton"))

    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(f, x, fd, k, v)
    want = fn(f, x, fd, k, v)
    for a, b in zip(got, want):
        assert_close(a, b, atol=0, rtol=0, name="compiled")
