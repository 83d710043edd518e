"""SC-CLIP's ops, `similarity_aggregation` and `averaged_dual_softmax`, on every CPU backend against
independent float64 formulas (tests/helpers/sc_clip_math.py): awkward sizes, batches against single images, strided views,
half-precision inputs, pairs built a hair either side of the threshold (no backend may flip
them), gradients, torch.compile, bad arguments."""
from __future__ import annotations

import pytest
import torch

from armfast import ops
from helpers.sc_clip_math import (alternating_values, cosines_f64, dual_inputs, dual_softmax_f64,
                                  near_threshold_features, similarity_f64, similarity_inputs)

CPU_READY = ops.backend_status("cpu")["cpu"] is None
BACKENDS = ["reference", "sdpa", pytest.param("cpu", marks=pytest.mark.skipif(
    not CPU_READY, reason=f"cpu backend unavailable: {ops.backend_status('cpu')['cpu']}"))]
FUSED = ["cpu"] if CPU_READY else []
HALF = (torch.bfloat16, torch.float16)
TOL = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10),
       torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
SIZES = [(2, 1), (2, 7), (2, 197), (1, 785)]  # (B, N)
pytestmark = pytest.mark.usefixtures("poisoned_allocations")  # outputs start as NaN


def check(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


# ---- values against float64 -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N", SIZES)
def test_similarity_aggregation_matches_float64(B, N, backend):
    f, x, threshold = similarity_inputs(B, N, seed=N)
    got = ops.similarity_aggregation(f, x, threshold=threshold, backend=backend)
    check(got, similarity_f64(f, x, threshold), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N", SIZES)
def test_averaged_dual_softmax_matches_float64(B, N, backend):
    f, k, v, beta = dual_inputs(B, N, seed=N)
    got = ops.averaged_dual_softmax(f, k, v, beta=beta, backend=backend)
    check(got, dual_softmax_f64(f, k, v, beta=beta), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters(backend):
    f, x, _ = similarity_inputs(2, 30, seed=3)
    for threshold in (0.0, 0.95, 1.5):  # everything positive kept; the diagonal only; nothing
        got = ops.similarity_aggregation(f, x, threshold=threshold, backend=backend)
        check(got, similarity_f64(f, x, threshold), torch.float32)
    f, k, v, beta = dual_inputs(2, 30, seed=3)
    got = ops.averaged_dual_softmax(f, k, v, scale=0.3, gamma=7.5, beta=beta, backend=backend)
    check(got, dual_softmax_f64(f, k, v, scale=0.3, gamma=7.5, beta=beta), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_feature_rows(backend):
    # normalised with the eps clamp, as F.normalize: S = 0 on the zero row and column
    f, x, threshold = similarity_inputs(1, 20, dtype=torch.float64, seed=4)
    f[0, 5] = 0
    check(ops.similarity_aggregation(f, x, threshold=threshold, backend=backend),
          similarity_f64(f, x, threshold), torch.float64)
    f, k, v, beta = dual_inputs(1, 20, dtype=torch.float64, seed=4)
    f[0, 5] = 0
    check(ops.averaged_dual_softmax(f, k, v, beta=beta, backend=backend),
          dual_softmax_f64(f, k, v, beta=beta), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF])
def test_dtypes_and_strided_views(dtype, backend):
    f, x, threshold = similarity_inputs(2, 37, dtype=dtype, strided=True, seed=5)
    fd, k, v, beta = dual_inputs(2, 37, dtype=dtype, strided=True, seed=5)
    assert not (f.is_contiguous() or x.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    if backend == "cpu" and dtype in HALF:  # float32/float64 kernels: refused with the reason
        with pytest.raises(TypeError, match="backend 'cpu' supports dtypes float32, float64"):
            ops.similarity_aggregation(f, x, backend=backend)
        with pytest.raises(TypeError, match="backend 'cpu' supports dtypes float32, float64"):
            ops.averaged_dual_softmax(fd, k, v, backend=backend)
        return
    check(ops.similarity_aggregation(f, x, threshold=threshold, backend=backend),
          similarity_f64(f, x, threshold), dtype)
    check(ops.averaged_dual_softmax(fd, k, v, beta=beta, backend=backend),
          dual_softmax_f64(fd, k, v, beta=beta), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_single_images(backend):
    # the images differ (and so do their mean similarities): nothing may leak across the batch
    f, x, threshold = similarity_inputs(3, 50, seed=6)
    batched = ops.similarity_aggregation(f, x, threshold=threshold, backend=backend)
    singles = [ops.similarity_aggregation(f[i:i + 1], x[i:i + 1], threshold=threshold,
                                          backend=backend) for i in range(3)]
    torch.testing.assert_close(batched, torch.cat(singles), **TOL[torch.float32])
    f, k, v, beta = dual_inputs(3, 50, seed=6)
    means = cosines_f64(f).mean(dim=(1, 2))
    assert (means.max() - means.min()) > 0.1
    batched = ops.averaged_dual_softmax(f, k, v, beta=beta, backend=backend)
    singles = [ops.averaged_dual_softmax(f[i:i + 1], k[i:i + 1], v[i:i + 1], beta=beta,
                                         backend=backend) for i in range(3)]
    torch.testing.assert_close(batched, torch.cat(singles), **TOL[torch.float32])


# ---- near the threshold: decided in float32 whatever the input dtype ---------------------------

@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
def test_similarity_near_threshold_no_backend_flips(dtype):
    f = near_threshold_features(dtype)
    x = alternating_values((2, 16, 8), dtype, torch.Generator().manual_seed(20))
    want = similarity_f64(f, x, 0.4)
    # the case can fail: the pairs a hair above 0.4 carry weight, dropping them changes the result
    assert (similarity_f64(f, x, 0.4 + 2e-3) - want).abs().max() > 20 * TOL[dtype]["atol"]
    for backend in ("reference", "sdpa", *FUSED):
        if backend == "cpu" and dtype in HALF:
            continue
        check(ops.similarity_aggregation(f, x, threshold=0.4, backend=backend), want, dtype)


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
def test_dual_softmax_near_threshold_no_backend_flips(dtype):
    f = near_threshold_features(dtype)
    g = torch.Generator().manual_seed(21)
    k = torch.randn(2, 2, 16, 8, dtype=torch.float64, generator=g).to(dtype)
    v = alternating_values((2, 2, 16, 8), dtype, g)
    # beta puts the threshold beta * mean(S) at 0.4 in both images (their means are equal: the
    # same pairs), so the pairs sit at 0.4 + OFFSETS from it
    means = cosines_f64(f).mean(dim=(1, 2))
    torch.testing.assert_close(means[0], means[1], atol=1e-15, rtol=0)
    beta = 0.4 / float(means[0])
    want = dual_softmax_f64(f, k, v, beta=beta)
    shifted = dual_softmax_f64(f, k, v, beta=beta * (1 + 5e-3))
    assert (shifted - want).abs().max() > 5 * TOL[dtype]["atol"]
    for backend in ("reference", "sdpa", *FUSED):
        if backend == "cpu" and dtype in HALF:
            continue
        check(ops.averaged_dual_softmax(f, k, v, beta=beta, backend=backend), want, dtype)


# ---- gradients, explain, torch.compile --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(backend):
    f, x, threshold = similarity_inputs(2, 9, C=6, D=5, dtype=torch.float64, seed=7)
    fd, k, v, beta = dual_inputs(2, 9, C=6, H=2, d=4, dtype=torch.float64, seed=7)
    cases = [((f, x), lambda f, x: ops.similarity_aggregation(f, x, threshold=threshold, backend=backend),
              lambda f, x: similarity_f64(f, x, threshold)),
             ((fd, k, v), lambda f, k, v: ops.averaged_dual_softmax(f, k, v, beta=beta, backend=backend),
              lambda f, k, v: dual_softmax_f64(f, k, v, beta=beta))]
    g = torch.Generator().manual_seed(8)
    for tensors, op, formula in cases:
        tensors = [t.detach().requires_grad_() for t in tensors]
        got, want = op(*tensors), formula(*tensors)
        dout = torch.randn(got.shape, dtype=torch.float64, generator=g)
        for a, b in zip(torch.autograd.grad(got, tensors, dout), torch.autograd.grad(want, tensors, dout)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_explain_and_auto():
    f, x, _ = similarity_inputs(1, 7)
    fd, k, v, _ = dual_inputs(1, 7)
    for op, args in ((ops.similarity_aggregation, (f, x)), (ops.averaged_dual_softmax, (fd, k, v))):
        e = ops.explain(op, *args)
        assert e.op == op.__name__ and e.backend in ops.available_backends("cpu")
        assert ops.explain(op.__name__, *args, backend="reference").backend == "reference"
    assert ops.explain(ops.similarity_aggregation, f, x).dim == 40  # D, not a head dim
    assert ops.explain(ops.averaged_dual_softmax, fd, k, v).dim == 16  # d


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_compile_fullgraph(backend):
    f, x, threshold = similarity_inputs(1, 13, C=8, D=8, seed=9)
    fd, k, v, beta = dual_inputs(1, 13, C=8, H=2, d=4, seed=9)
    x, k = x.requires_grad_(), k.requires_grad_()

    def fn(f, x, k, v):
        a = ops.similarity_aggregation(f, x, threshold=threshold, backend=backend)
        b = ops.averaged_dual_softmax(fd, k, v, beta=beta, backend=backend)
        return a.square().sum() + b.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, want = compiled(f, x, k, v), fn(f, x, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (x, k)), torch.autograd.grad(want, (x, k))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- bad arguments ----------------------------------------------------------------------------

def _inputs():
    return torch.randn(2, 13, 6), torch.randn(2, 13, 5), torch.randn(2, 3, 13, 4)


@pytest.mark.parametrize("call_it,error,match", [
    (lambda f, x, k: ops.similarity_aggregation(f[0], x), ValueError, r"f must be 3-D \[B, N, C\]"),
    (lambda f, x, k: ops.similarity_aggregation(f, x[:, :12]), ValueError,
     r"x must be \[B, N, D\] with f's B=2 and N=13, got \(2, 12, 5\)"),
    (lambda f, x, k: ops.similarity_aggregation(f, x[:1]), ValueError, r"x must be \[B, N, D\] with f's B=2"),
    (lambda f, x, k: ops.similarity_aggregation(f, x.double()), TypeError, "x must have the dtype of f"),
    (lambda f, x, k: ops.similarity_aggregation(f, x.long()), TypeError, "x must be a floating-point"),
    (lambda f, x, k: ops.similarity_aggregation(f.numpy(), x), TypeError, "f must be a torch.Tensor"),
    (lambda f, x, k: ops.similarity_aggregation(f, x, threshold=-0.1), ValueError, "threshold must be >= 0"),
    (lambda f, x, k: ops.similarity_aggregation(f, x, threshold=float("nan")), ValueError,
     "threshold must be finite"),
    (lambda f, x, k: ops.similarity_aggregation(f, x, threshold="0.4"), TypeError,
     "threshold must be a real number"),
    (lambda f, x, k: ops.similarity_aggregation(f, x, backend="fast"), ValueError, "backend must be 'auto' or"),
    (lambda f, x, k: ops.averaged_dual_softmax(f, k, k[..., :3]), ValueError, "v must have the shape of k"),
    (lambda f, x, k: ops.averaged_dual_softmax(f, k[:, :, :12], k[:, :, :12]), ValueError,
     r"k must be \[B, H, N, d\] with f's B=2 and N=13"),
    (lambda f, x, k: ops.averaged_dual_softmax(f[:, None], k, k), ValueError, r"f must be 3-D \[B, N, C\]"),
    (lambda f, x, k: ops.averaged_dual_softmax(f.double(), k, k), TypeError, "k must have the dtype of f"),
    (lambda f, x, k: ops.averaged_dual_softmax(f, k[0], k[0]), ValueError, r"k must be 4-D \[B, H, N, d\]"),
    (lambda f, x, k: ops.averaged_dual_softmax(f, k, k, gamma=0), ValueError, "gamma must be finite and > 0"),
    (lambda f, x, k: ops.averaged_dual_softmax(f, k, k, beta=float("inf")), ValueError, "beta must be finite"),
    (lambda f, x, k: ops.averaged_dual_softmax(f, k, k, scale=-1.0), ValueError, "scale must be finite and > 0"),
    (lambda f, x, k: ops.averaged_dual_softmax(f, k, k, scale="s"), TypeError, "scale must be a real number"),
])
def test_bad_arguments(call_it, error, match):
    with pytest.raises(error, match=match):
        call_it(*_inputs())

