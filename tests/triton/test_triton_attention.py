"""Triton flash attention against the float64 ground truth: outputs, saved lse and gradients."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from armfast.ops._backends import triton as _triton
from armfast.ops import attention
from helpers.tensors import DEVICE, assert_close, attention_f64, make_qkv, max_err

INTERPRETED = DEVICE.type == "cpu"

# (B, H, Nq, Nk, d, strided). Under the interpreter (32 x 32 tiles) lengths 1, 7, 197 and 785
# cover a single partial tile, several tiles with a partial last one, and Nq != Nk both ways.
CASES = [
    (1, 1, 1, 1, 32, False),
    (2, 2, 7, 7, 64, False),
    (1, 2, 197, 197, 32, True),
    (1, 1, 7, 197, 40, False),  # odd head dim: BLOCK_D 64 with a masked tail
    (1, 1, 197, 7, 128, True),
    (1, 1, 785, 785, 32, True),
    (1, 1, 785, 1, 16, False),
]


def _run(q, k, v, scale=None):
    """Triton forward + backward on leaf copies, and the float64 reference on its own copies;
    returns (out, dq, dk, dv) of both and the upstream gradient used."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, scale=scale, backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_f64(*ref_in, scale=scale)
    ref.backward(dout.double())
    return (out, q.grad, k.grad, v.grad), (ref, *(t.grad for t in ref_in)), dout


def _torch_in_dtype(q, k, v, dout):
    """Plain PyTorch attention in the inputs' own dtype: the error budget of that precision."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("B,H,Nq,Nk,d,strided", CASES)
def test_matches_float64(B, H, Nq, Nk, d, strided):
    torch.manual_seed(Nq * 1000 + Nk + d)
    q, k, v = make_qkv(B, H, Nq, Nk, d, device=DEVICE, strided=strided)
    got, want, _ = _run(q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == torch.float32 and g.is_contiguous(), name
        assert_close(g, w, atol=2e-5, rtol=1e-4, name=name)


def test_lse_and_custom_scale():
    torch.manual_seed(1)
    q, k, v = make_qkv(1, 2, 33, 65, 32, device=DEVICE)
    out, lse = _triton.BACKEND.attention.run_forward(q, k, v, 0.3, False)
    s = (q.double() @ k.double().transpose(-2, -1)) * 0.3
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 33)
    assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5, name="lse")
    got, want, _ = _run(q, k, v, scale=0.3)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, atol=2e-5, rtol=1e-4, name=name)


def test_large_scores_stay_finite():
    """Scores of +-200 (std 64) overflow a naive float32 exp; the online softmax must not."""
    torch.manual_seed(2)
    q, k, v = make_qkv(1, 1, 40, 70, 32, device=DEVICE)
    got, want, _ = _run(q * 8, k * 8, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        assert_close(g, w, atol=1e-4, rtol=1e-4, name=name)


@pytest.mark.interpreter_only
def test_float64_and_gradcheck():
    torch.manual_seed(3)
    q, k, v = make_qkv(1, 2, 9, 20, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    got, want, _ = _run(q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == torch.float64
        assert_close(g, w, atol=1e-6, rtol=1e-6, name=name)
    assert torch.autograd.gradcheck(lambda *t: attention(*t, backend="triton"), (q, k, v),
                                    fast_mode=True)


@pytest.fixture
def deterministic():
    """`torch.use_deterministic_algorithms(True)` for one test (warn_only: other ops may lack a
    deterministic version)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("B,H,Nq,Nk,d,strided", CASES)
def test_deterministic_path_matches_float64(deterministic, B, H, Nq, Nk, d, strided):
    """The deterministic path: its dQ kernel also computes delta = rowsum(dO * O), which the
    dK, dV kernel reads afterwards, over the same partial tiles and strides."""
    torch.manual_seed(Nq * 1000 + Nk + d + 1)
    q, k, v = make_qkv(B, H, Nq, Nk, d, device=DEVICE, strided=strided)
    got, want, _ = _run(q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, atol=2e-5, rtol=1e-4, name=name)


def test_deterministic_backward_is_reproducible_and_right(deterministic):
    """Deterministic mode sums dQ in its own kernel, in a fixed order: bit-identical reruns.
    (The default path adds dQ with float32 atomics, whose order a GPU does not fix.)"""
    torch.manual_seed(4)
    q, k, v = make_qkv(1, 2, 70, 45, 32, device=DEVICE, strided=True)
    out, lse = _triton.BACKEND.attention.run_forward(q, k, v, 0.2, False)
    dout = torch.randn_like(out)
    first = _triton.attention.attention_backward(dout, q, k, v, out, lse, 0.2)
    second = _triton.attention.attention_backward(dout, q, k, v, out, lse, 0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    got, want, _ = _run(q, k, v, scale=0.2)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, atol=2e-5, rtol=1e-4, name=name)


def _score_rounding(q, k, scale):
    """A priori relative error of p = exp(s - lse) from float32 scores: |ds| <= d u sum |q_i k_i|
    (u = 2**-24) for a dot product summed in any order, once in the forward's lse and once in
    the backward's recomputed score."""
    bound = (q.double().abs() @ k.double().abs().transpose(-2, -1)).max().item()
    return 2 * scale * q.shape[-1] * 2.0 ** -24 * bound


def test_very_negative_scores_leave_no_nan_in_partial_key_tiles():
    """Every score of a row far below zero: lse ~ -400, so exp(score - lse) of a zero-filled key
    past N_K would overflow; those keys must be masked out of dQ, not multiplied by zero.

    The error budget is what float32 can give on these inputs, not a fixed tolerance: with
    |q.k| up to ~900 a float32 score is off by up to ~1e-4 depending on the summation order of
    its dot product, and the flash backward recomputes each score apart from the forward's lse.
    Under the interpreter that order is numpy's BLAS kernel, which OpenBLAS picks per CPU: its
    Haswell and Zen kernels put dk 2x past the fixed 1e-4 this test had, its SkylakeX kernel
    0.9x, and PyTorch's own float32 attention is 2.3x past it; so a fixed bound passed or failed
    with the machine, not with Triton's version. A masking bug gives inf/NaN or errors of the
    size of the gradients, far above the budget. The next test runs this under several BLAS
    kernels."""
    torch.manual_seed(5)
    q, k, v = make_qkv(1, 1, 40, 45, 16, device=DEVICE)
    k = k.abs() + 1.0
    q = -20.0 * (q.abs() + 1.0)  # q.k <= -320 on every pair: scores of -80 and below
    got, want, dout = _run(q, k, v)
    budget = _torch_in_dtype(q, k, v, dout)
    rounding = _score_rounding(q, k, q.shape[-1] ** -0.5)
    for name, g, w, h in zip(("out", "dq", "dk", "dv"), got, want, budget):
        assert torch.isfinite(g).all(), name
        err, err_torch = max_err(g, w), max_err(h, w)
        allowed = 2 * err_torch + rounding * w.abs().max().item()
        assert err <= allowed, f"{name}: error {err:.2e}, allowed {allowed:.2e} (PyTorch " \
                               f"float32: {err_torch:.2e}, score rounding {rounding:.1e})"


@pytest.mark.skipif(not INTERPRETED or platform.machine() not in ("x86_64", "AMD64"),
                    reason="numpy's BLAS kernels matter only to the interpreter on x86-64")
@pytest.mark.parametrize("coretype", ["Haswell", "Prescott"])
def test_very_negative_scores_under_each_blas_kernel(coretype, tmp_path):
    """The interpreter's tl.dot is numpy's matmul, so the test above sees a different rounding
    under each OpenBLAS kernel (AVX2 and SSE3 ones here; which one runs by default depends on the
    CPU). Pass under each: a machine or numpy change alone must not turn the suite red."""
    env = {**os.environ, "OPENBLAS_CORETYPE": coretype, "TRITON_INTERPRET": "1"}
    test = f"{__file__}::test_very_negative_scores_leave_no_nan_in_partial_key_tiles"
    # run from elsewhere: `python -m pytest` puts its working directory first on sys.path, and
    # the source tree's armfast (no compiled parts, no armfast.kernels) must not shadow the
    # installed one
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("heads_last", [False, True])
def test_tma_forward_matches_float64(heads_last):
    """The TMA forward (a candidate on Hopper for large inputs) run by the interpreter, on
    [B, H, N, d] tensors and on [B, N, H, d] ones viewed as such, Nq != Nk, partial tiles."""
    from armfast.kernels import attention as kernels
    from armfast.kernels._tuning import Launch
    torch.manual_seed(9)
    B, H, Nq, Nk, d = 2, 3, 45, 70, 32

    def make(n):
        t = torch.randn(B, n, H, d).transpose(1, 2) if heads_last else torch.randn(B, H, n, d)
        return t.to(DEVICE)
    q, k, v = make(Nq), make(Nk), make(Nk)
    out = make(Nq)
    assert _triton.attention._tma_ready(q, k, v, out)
    assert not _triton.attention._tma_ready(q[..., ::2], k[..., ::2], v[..., ::2], out[..., ::2])
    launch = Launch(kernels._configs([(32, 32, 4, 2)], VARIANT="tma")[0],
                    _triton._launch.attention_constexprs(q, "ieee"))
    lse = torch.empty(B, H, Nq, device=DEVICE)
    _triton.attention._launch_fwd(q, k, v, out, lse, 0.3, launch)
    s = (q.double() @ k.double().transpose(-2, -1)) * 0.3
    assert_close(out, torch.softmax(s, -1) @ v.double(), atol=2e-5, rtol=1e-4, name="out")
    assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5, name="lse")


def test_opcheck():
    torch.manual_seed(6)
    q, k, v = make_qkv(1, 2, 5, 17, 16, device=DEVICE, requires_grad=True)
    fn = _triton.BACKEND.attention
    torch.library.opcheck(fn.forward_op, (q, k, v, 0.25))
    out, lse = fn.forward_op(q, k, v, 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(fn.backward_op, (dout, q.detach(), k.detach(), v.detach(), out.detach(),
                                           lse.detach(), 0.25))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Nq,Nk,d", [(197, 197, 64), (785, 785, 64), (785, 50, 128), (7, 300, 32),
                                     (1000, 1000, 40)])
def test_half_precision_gpu(dtype, Nq, Nk, d):
    """Triton in half precision errs at most about as much as PyTorch in that precision."""
    torch.manual_seed(7)
    q, k, v = make_qkv(2, 8, Nq, Nk, d, dtype=dtype, device="cuda", strided=True)
    got, want, dout = _run(q, k, v)
    budget = _torch_in_dtype(q, k, v, dout)
    for name, g, w, h in zip(("out", "dq", "dk", "dv"), got, want, budget):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        err, err_torch = max_err(g, w), max_err(h, w)
        assert err <= 2 * err_torch + 1e-3, f"{name}: error {err:.2e}, PyTorch {dtype}: {err_torch:.2e}"


@pytest.mark.gpu
def test_float32_gpu_large():
    torch.manual_seed(8)
    q, k, v = make_qkv(4, 8, 1025, 785, 64, device="cuda", strided=True)
    got, want, _ = _run(q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, atol=1e-4, rtol=1e-3, name=name)
