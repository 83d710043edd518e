"""The `cpu` backend (C++/OpenMP kernels of armfast._C) against independent float64 math."""
import pytest
import torch

from armfast import ops
from helpers.internals import cpu_backend, cuda_backend, extension as _extension
from helpers.internals import library as _library
from helpers.baseline_math import (gaussian_self_correlation_f64, heads, self_correlation_f64,
                                   self_correlation_sum_f64)
from helpers.tensors import AWKWARD_N, attention_f64, make_qkv, patch_text_logits_f64

CPU_BACKEND = cpu_backend.BACKEND

pytestmark = pytest.mark.skipif(ops.backend_status("cpu")["cpu"] is not None,
                                reason=f"cpu backend unavailable: {ops.backend_status('cpu')['cpu']}")

GRAD_TOL = {torch.float32: dict(atol=5e-5, rtol=1e-4), torch.float64: dict(atol=1e-11, rtol=1e-9)}
OUT_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs start as NaN, so an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(_library, "POISON_ALLOCATIONS", True)


def check_attention(q, k, v, *, scale=None, generator=None):
    out = ops.attention(q, k, v, scale=scale, backend="cpu")
    expected = attention_f64(q, k, v, scale)
    assert out.shape == expected.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, **OUT_TOL[q.dtype])
    dout = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout.double())
    for name, got, want in zip("qkv", grads, expected_grads):
        assert got.dtype == q.dtype, name
        torch.testing.assert_close(got.double(), want.double(), **GRAD_TOL[q.dtype], msg=f"d{name}")


# ---- attention --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", AWKWARD_N)
@pytest.mark.parametrize("strided", [False, True])
def test_attention_matches_float64(n, strided, poisoned):
    g = torch.Generator().manual_seed(n)
    q, k, v = make_qkv(1, 2, n, n, 64, strided=strided, requires_grad=True, generator=g)
    check_attention(q, k, v, generator=g)


@pytest.mark.parametrize("d", [32, 64, 128, 1, 20, 72])
def test_attention_head_dims(d, poisoned):
    g = torch.Generator().manual_seed(d)
    q, k, v = make_qkv(2, 1, 67, 45, d, requires_grad=True, generator=g)
    check_attention(q, k, v, generator=g)


@pytest.mark.parametrize("nq,nk,d", [(7, 197, 64), (197, 1, 32), (5, 33, 128), (130, 65, 17)])
def test_attention_cross_lengths_and_scale(nq, nk, d, poisoned):
    g = torch.Generator().manual_seed(nq * nk)
    q, k, v = make_qkv(2, 3, nq, nk, d, strided=True, requires_grad=True, generator=g)
    check_attention(q, k, v, scale=0.3, generator=g)


@pytest.mark.parametrize("n", [7, 130])
def test_attention_float64_is_exact(n):
    g = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 2, n, n + 3, 24, dtype=torch.float64, strided=True, requires_grad=True,
                       generator=g)
    check_attention(q, k, v, generator=g)


def test_attention_saves_log_sum_exp():
    g = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(1, 2, 70, 90, 32, strided=True, generator=g)
    out, lse = CPU_BACKEND.attention.forward_op(q, k, v, 0.2)
    s = q.double() @ k.double().transpose(-2, -1) * 0.2
    assert lse.dtype == torch.float32 and lse.is_contiguous() and out.is_contiguous()
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def test_attention_expanded_grad():
    # out.sum().backward() hands the kernel a zero-stride dout
    g = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(1, 2, 33, 40, 16, requires_grad=True, generator=g)
    ops.attention(q, k, v, backend="cpu").sum().backward()
    expected = torch.autograd.grad(attention_f64(q, k, v).sum(), (q, k, v))
    for got, want in zip((q.grad, k.grad, v.grad), expected):
        torch.testing.assert_close(got.double(), want.double(), **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_instruction_set_path(isa, monkeypatch):
    # The CPU may lack the requested set; the kernels then run the best one it has, which is
    # still checked here.
    monkeypatch.setenv("ARMFAST_CPU_ISA", isa)
    from armfast import _C
    order = ["generic", "avx2", "avx512"]
    assert order.index(_C.isa()) <= order.index(isa)
    g = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(1, 2, 75, 70, 40, strided=True, requires_grad=True, generator=g)
    check_attention(q, k, v, generator=g)
    x = torch.randn(2, 9, 21, generator=g, requires_grad=True)
    text = torch.randn(5, 21, generator=g, requires_grad=True)
    check_logits(x, text, torch.tensor(3.0, requires_grad=True), generator=g)
    for d, strided in ((20, False), (64, True)):  # value rows copied (a vector tail) / in place
        for op, got, want in self_correlations(heads(1, 2, 75, d, strided=strided, generator=g),
                                               grid=(2, 37)):
            torch.testing.assert_close(got.double(), want, **OUT_TOL[torch.float32], msg=op)


def self_correlations(tensors, grid):
    """(op, cpu output, float64 formula) of ClearCLIP, SCLIP and NACLIP on q, k, v = tensors."""
    q, k, v = tensors
    yield ("self_correlation", ops.self_correlation(q, v, backend="cpu"), self_correlation_f64(q, v))
    yield ("self_correlation_sum", ops.self_correlation_sum(q, k, v, backend="cpu"),
           self_correlation_sum_f64(q, k, v))
    yield ("gaussian_self_correlation", ops.gaussian_self_correlation(q, v, grid=grid, backend="cpu"),
           gaussian_self_correlation_f64(q, v, grid))


def test_results_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(2, 2, 150, 140, 32, requires_grad=True, generator=g)
    dout = torch.randn(2, 2, 150, 32, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            out = ops.attention(q, k, v, backend="cpu")
            results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_self_correlations_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(15)
    tensors = heads(1, 3, 1 + 10 * 13, 64, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append([got for _, got, _ in self_correlations(tensors, grid=(10, 13))])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_attention_gradcheck_float64():
    g = torch.Generator().manual_seed(10)
    q, k, v = make_qkv(1, 2, 5, 7, 8, dtype=torch.float64, strided=True, requires_grad=True, generator=g)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, backend="cpu"), (q, k, v))
    # more than one query and key tile (64 each); fast mode checks a random projection
    q, k, v = make_qkv(1, 1, 70, 66, 3, dtype=torch.float64, requires_grad=True, generator=g)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, backend="cpu"), (q, k, v),
                                    fast_mode=True)


def test_attention_opcheck():
    g = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(1, 2, 9, 11, 16, strided=True, requires_grad=True, generator=g)
    torch.library.opcheck(CPU_BACKEND.attention.forward_op, (q, k, v, 0.25))
    q, k, v = q.detach(), k.detach(), v.detach()  # the backward op itself has no autograd
    out, lse = CPU_BACKEND.attention.forward_op(q, k, v, 0.25)
    torch.library.opcheck(CPU_BACKEND.attention.backward_op,
                          (torch.randn(out.shape, generator=g), q, k, v, out, lse, 0.25))


# ---- patch_text_logits --------------------------------------------------------------------------

def check_logits(x, text, scale, *, generator=None):
    out = ops.patch_text_logits(x, text, logit_scale=scale, backend="cpu")
    expected = patch_text_logits_f64(x, text, scale)
    assert out.dtype == x.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, **OUT_TOL[x.dtype])
    dout = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(x.dtype)
    inputs = (x, text, scale)
    grads = torch.autograd.grad(out, inputs, dout)
    expected_grads = torch.autograd.grad(expected, inputs, dout.double())
    tol = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}
    for name, got, want in zip(("x", "text", "logit_scale"), grads, expected_grads):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        torch.testing.assert_close(got.double(), want.double(), **tol[x.dtype], msg=f"d{name}")


@pytest.mark.parametrize("n", [1, 7, 197])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patch_text_logits_matches_float64(n, dtype, poisoned):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 40, generator=g, dtype=dtype, requires_grad=True)
    text = torch.randn(19, 40, generator=g, dtype=dtype, requires_grad=True)
    check_logits(x, text, torch.tensor(40.0, dtype=dtype, requires_grad=True), generator=g)


def test_patch_text_logits_strided_and_float32_scale_for_float64_inputs(poisoned):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 66, 2, dtype=torch.float64, generator=g).transpose(1, 2)[:, :, ::2]
    text = torch.randn(33, 17, dtype=torch.float64, generator=g).t()  # [17, 33]
    x, text = x.requires_grad_(), text.requires_grad_()
    assert not x.is_contiguous() and not text.is_contiguous()
    check_logits(x, text, torch.tensor(2.5, requires_grad=True), generator=g)


def test_patch_text_logits_zero_rows_follow_the_eps_clamp():
    # normalize() clamps the norm at 1e-12: a zero row gives zero logits and a gradient of
    # dout-projected / eps, exactly as the reference backend computes it.
    g = torch.Generator().manual_seed(13)
    x = torch.randn(1, 4, 8, dtype=torch.float64, generator=g)
    x[0, 1] = 0
    text = torch.randn(3, 8, dtype=torch.float64, generator=g)
    text[2] = 0
    x, text = x.requires_grad_(), text.requires_grad_()
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(1, 4, 3, dtype=torch.float64, generator=g)
    results = []
    for backend in ("cpu", "reference"):
        out = ops.patch_text_logits(x, text, logit_scale=scale, backend=backend)
        results.append((out, *torch.autograd.grad(out, (x, text, scale), dout)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_patch_text_logits_number_scale_and_no_grad():
    g = torch.Generator().manual_seed(14)
    x, text = torch.randn(2, 5, 12, generator=g), torch.randn(4, 12, generator=g)
    with torch.no_grad():
        out = ops.patch_text_logits(x, text, logit_scale=50.0, backend="cpu")
    torch.testing.assert_close(out.double(), patch_text_logits_f64(x, text, 50.0), atol=1e-4, rtol=1e-5)


def test_patch_text_logits_gradcheck_float64():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    text = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.patch_text_logits(a, b, logit_scale=c, backend="cpu"), (x, text, scale))


def test_patch_text_logits_opcheck():
    g = torch.Generator().manual_seed(16)
    x = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    text = torch.randn(4, 12, generator=g, requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    torch.library.opcheck(CPU_BACKEND.patch_text_logits.forward_op, (x, text, scale))
    dout = torch.randn(2, 5, 4, generator=g)
    torch.library.opcheck(CPU_BACKEND.patch_text_logits.backward_op,
                          (dout, x.detach(), text.detach(), scale.detach()))


# ---- errors -------------------------------------------------------------------------------------

def test_cuda_backend_on_this_machine_says_why():
    q, k, v = make_qkv(1, 1, 4, 4, 32)
    reason = ops.backend_status("cpu")["cuda"]
    assert reason  # the cuda backend never runs on CPU tensors
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available on cpu"):
        ops.attention(q, k, v, backend="cuda")
    if not torch.cuda.is_available():
        assert ops.backend_status("cuda")["cuda"]  # and says why it cannot run on this machine


def test_cpu_backend_rejects_what_it_cannot_run():
    q, k, v = make_qkv(1, 1, 4, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="backend 'cpu' supports dtypes float32, float64"):
        ops.attention(q, k, v, backend="cpu")
    q, k, v = make_qkv(1, 1, 4, 4, 8)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        CPU_BACKEND.attention.forward_op(q, k.double(), v, 1.0)


def test_extension_checks_shapes_itself():
    from armfast import _C
    q, k, v = make_qkv(1, 2, 4, 5, 8)
    out, lse = torch.empty(1, 2, 4, 8), torch.empty(1, 2, 4)
    arg = _extension.arg
    with pytest.raises(ValueError, match=r"k: expected shape \(1, 2, -1, 8\)"):
        _C.attention_forward("float32", arg(q), arg(k[..., :4]), arg(v), arg(out), arg(lse), 1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        _C.attention_forward("float16", arg(q), arg(k), arg(v), arg(out), arg(lse), 1.0)


# ---- availability (which builds run on which GPU; pure Python) ------------------------------- -------------------------------------------------------------------------------

@pytest.mark.parametrize("archs,capability,runs", [
    ("8.0;9.0", (8, 0), True), ("8.0;9.0", (8, 6), True), ("8.0;9.0", (8, 9), True),
    ("8.0;9.0", (9, 0), True), ("8.0;9.0", (10, 0), False), ("8.0;9.0", (12, 0), False),
    ("8.6", (8, 0), False), ("9.0+PTX", (10, 0), True), ("9.0+PTX", (8, 9), False),
    ("9.0a", (9, 0), True), ("9.0a", (10, 0), False), ("9.0a+PTX", (10, 0), False),
    ("10.0a", (10, 3), False), ("10.0f", (10, 0), True), ("10.0f", (10, 3), True),
    ("10.3f", (10, 0), False), ("10.0f", (12, 0), False), ("10.0f+PTX", (12, 0), False),
    ("12.0f", (12, 1), True), ("8.0, 12.0f", (12, 1), True), ("", (8, 0), False),
])
def test_arch_list_compatibility(archs, capability, runs):
    assert cuda_backend._arch_runs(archs, capability) is runs
