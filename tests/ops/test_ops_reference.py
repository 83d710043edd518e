"""The reference and sdpa backends against independent float64 math."""
import pytest
import torch

from armfast import ops
from helpers.internals import reference_backend
from helpers.tensors import AWKWARD_N, attention_f64, make_qkv, patch_text_logits_f64

REFERENCE = reference_backend.BACKEND

PLAIN_BACKENDS = ("reference", "sdpa")


@pytest.mark.parametrize("backend", PLAIN_BACKENDS)
@pytest.mark.parametrize("n", AWKWARD_N)
@pytest.mark.parametrize("strided", [False, True])
def test_attention_matches_float64(backend, n, strided):
    g = torch.Generator().manual_seed(n)
    q, k, v = make_qkv(1, 2, n, n, 32, strided=strided, requires_grad=True, generator=g)
    out = ops.attention(q, k, v, backend=backend)
    expected = attention_f64(q, k, v)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)

    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout.double())
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", PLAIN_BACKENDS)
@pytest.mark.parametrize("nq,nk,d", [(7, 197, 64), (197, 1, 32), (5, 33, 128)])
def test_attention_cross_lengths_and_scale(backend, nq, nk, d):
    g = torch.Generator().manual_seed(nq * nk)
    q, k, v = make_qkv(2, 3, nq, nk, d, generator=g)
    out = ops.attention(q, k, v, scale=0.3, backend=backend)
    assert out.shape == (2, 3, nq, d) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), attention_f64(q, k, v, 0.3), atol=2e-5, rtol=1e-4)


def test_attention_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(1, 2, 5, 7, 8, dtype=torch.float64, strided=True, requires_grad=True, generator=g)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, backend="reference"), (q, k, v))


def test_attention_half_precision_computes_in_float32():
    g = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(1, 1, 9, 9, 16, dtype=torch.bfloat16, generator=g)
    out = ops.attention(q, k, v, backend="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), attention_f64(q, k, v), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", PLAIN_BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 197])
def test_patch_text_logits_matches_float64(backend, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 24, generator=g).requires_grad_()
    text = torch.randn(5, 24, generator=g)[:, ::1].requires_grad_()
    scale = torch.tensor(40.0, requires_grad=True)
    out = ops.patch_text_logits(x, text, logit_scale=scale, backend=backend)
    expected = patch_text_logits_f64(x, text, scale)
    torch.testing.assert_close(out.double(), expected, atol=5e-5, rtol=1e-4)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (x, text, scale), dout)
    expected_grads = torch.autograd.grad(expected, (x, text, scale), dout.double())
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


def test_patch_text_logits_strided_and_number_scale():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, 2, generator=g).transpose(1, 2)[:, :, ::2]  # [3, 2, 8] non-contiguous
    text = torch.randn(8, 4, generator=g).t()  # [4, 8] non-contiguous
    out = ops.patch_text_logits(x, text, logit_scale=2.5, backend="reference")
    torch.testing.assert_close(out.double(), patch_text_logits_f64(x, text, 2.5), atol=1e-5, rtol=1e-5)


def test_patch_text_logits_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g).requires_grad_()
    text = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_()
    scale = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.patch_text_logits(a, b, logit_scale=c, backend="reference"), (x, text, scale))


def test_opcheck_reference_ops():
    g = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 2, 5, 3, 8, strided=True, requires_grad=True, generator=g)
    torch.library.opcheck(REFERENCE.attention.forward_op, (q, k, v, 0.35))
    x = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    text = torch.randn(4, 6, generator=g, requires_grad=True)
    torch.library.opcheck(REFERENCE.patch_text_logits.forward_op, (x, text, torch.tensor(2.0, requires_grad=True)))


def test_torch_compile_traces_custom_op():
    g = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(1, 2, 9, 9, 16, generator=g)
    compiled = torch.compile(lambda a, b, c: ops.attention(a, b, c, backend="reference"), backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), ops.attention(q, k, v, backend="reference"))


def test_available_backends_lists_plain_ones():
    names = ops.available_backends("cpu")
    assert {"reference", "sdpa"} <= set(names)
    status = ops.backend_status("cpu")
    assert set(status) == set(ops.BACKENDS)
    assert all(reason is None or isinstance(reason, str) for reason in status.values())


def test_auto_resolves_to_an_available_backend():
    q = torch.randn(1, 1, 4, 8)
    assert ops.resolve_backend("attention", "auto", q) in ops.available_backends("cpu")
