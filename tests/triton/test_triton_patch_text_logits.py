"""Triton cosine logits against the float64 ground truth: outputs and gradients to x, text and
logit_scale."""
from __future__ import annotations

import pytest
import torch

from armfast.ops import _specs, patch_text_logits
from armfast.ops._backends import triton as _triton
from helpers.tensors import DEVICE, assert_close, max_err, patch_text_logits_f64


# (B, N, E, C, strided). Under the interpreter the tiles are 32 rows x 32 classes x 32 features:
# lengths 1, 7, 197, 785 cover one partial tile and several tiles with a partial last one.
CASES = [
    (1, 1, 32, 1, False),
    (2, 7, 40, 5, True),
    (1, 197, 70, 33, True),
    (2, 197, 16, 3, False),
    (1, 785, 24, 2, True),
]


def _inputs(B, N, E, C, strided, dtype=torch.float32, device=DEVICE):
    if strided:  # every other feature of a wider buffer, x also transposed in (B, N)
        x = torch.randn(N, B, 2 * E, dtype=torch.float64)[..., ::2].transpose(0, 1)
        text = torch.randn(C, 2 * E, dtype=torch.float64)[:, 1::2]
        assert not x.is_contiguous() and not text.is_contiguous()
    else:
        x = torch.randn(B, N, E, dtype=torch.float64)
        text = torch.randn(C, E, dtype=torch.float64)
    scale = torch.tensor(7.5, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, text, scale))


def _run(x, text, scale, dout=None):
    """Triton forward + backward on leaf copies; the same through the float64 ground truth."""
    x, text, scale = (t.detach().requires_grad_() for t in (x, text, scale))
    out = patch_text_logits(x, text, logit_scale=scale, backend="triton")
    dout = torch.randn_like(out) if dout is None else dout
    out.backward(dout)
    ref_in = [t.detach().double().requires_grad_() for t in (x, text, scale)]
    ref = patch_text_logits_f64(*ref_in)
    ref.backward(dout.double())
    return (out, x.grad, text.grad, scale.grad), (ref, *(t.grad for t in ref_in))


NAMES = ("out", "dx", "dtext", "dlogit_scale")


@pytest.mark.parametrize("B,N,E,C,strided", CASES)
def test_matches_float64(B, N, E, C, strided):
    torch.manual_seed(B * N + E + C)
    got, want = _run(*_inputs(B, N, E, C, strided))
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        assert_close(g, w, atol=1e-5, rtol=1e-4, name=name)


def test_strided_upstream_gradient():
    """`out.sum()` hands the backward an expanded dout with zero strides."""
    torch.manual_seed(1)
    x, text, scale = _inputs(2, 9, 20, 4, True)
    x, text, scale = (t.requires_grad_() for t in (x, text, scale))
    patch_text_logits(x, text, logit_scale=scale, backend="triton").sum().backward()
    ref_in = [t.detach().double().requires_grad_() for t in (x, text, scale)]
    patch_text_logits_f64(*ref_in).sum().backward()
    for name, g, w in zip(NAMES[1:], (x.grad, text.grad, scale.grad), (t.grad for t in ref_in)):
        assert_close(g, w, atol=1e-5, rtol=1e-4, name=name)


def test_zero_rows_follow_the_eps_clamp():
    """A zero feature or text row: the norm is clamped at 1e-12 as in F.normalize, no NaN."""
    torch.manual_seed(2)
    x, text, scale = _inputs(1, 40, 36, 35, False)
    x[0, 3] = 0
    text[5] = 0
    dout = torch.randn(1, 40, 35, device=DEVICE)
    got, _ = _run(x, text, scale, dout)
    want = (_specs.patch_text_logits_forward(x.double(), text.double(), scale.double()),
            *_specs.patch_text_logits_backward(dout.double(), x.double(), text.double(),
                                                   scale.double()))
    for name, g, w in zip(NAMES, got, want):
        assert torch.isfinite(g).all(), name
        assert_close(g, w, atol=1e-5, rtol=1e-4, name=name)


def test_python_number_scale_and_public_api():
    torch.manual_seed(3)
    x, text, _ = _inputs(2, 5, 24, 3, False)
    out = patch_text_logits(x, text, logit_scale=2.0, backend="triton")
    assert_close(out, patch_text_logits_f64(x, text, 2.0), atol=1e-5, rtol=1e-5, name="out")


@pytest.mark.interpreter_only
def test_float64_and_gradcheck():
    torch.manual_seed(4)
    x, text, scale = _inputs(2, 5, 12, 3, True, dtype=torch.float64)
    got, want = _run(x, text, scale)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float64
        assert_close(g, w, atol=1e-10, rtol=1e-10, name=name)
    args = tuple(t.detach().requires_grad_() for t in (x, text, scale))
    assert torch.autograd.gradcheck(
        lambda a, b, c: patch_text_logits(a, b, logit_scale=c, backend="triton"), args)


def test_backward_is_deterministic():
    torch.manual_seed(5)
    x, text, scale = _inputs(2, 50, 40, 9, True)
    dout = torch.randn(2, 50, 9, device=DEVICE)
    first = _triton.patch_text_logits.patch_text_logits_backward(dout, x, text, scale)
    second = _triton.patch_text_logits.patch_text_logits_backward(dout, x, text, scale)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_opcheck():
    torch.manual_seed(6)
    x, text, scale = (t.requires_grad_() for t in _inputs(1, 6, 20, 3, False))
    fn = _triton.BACKEND.patch_text_logits
    torch.library.opcheck(fn.forward_op, (x, text, scale))
    dout = torch.randn(1, 6, 3, device=DEVICE)
    torch.library.opcheck(fn.backward_op, (dout, x.detach(), text.detach(), scale.detach()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,E,C", [(2, 196, 512, 171), (4, 785, 512, 21), (1, 7, 768, 1000)])
def test_half_precision_gpu(dtype, B, N, E, C):
    """Half precision errs at most about as much as `F.normalize` + matmul in that precision."""
    torch.manual_seed(7)
    x, text, scale = _inputs(B, N, E, C, True, dtype=dtype, device="cuda")
    scale = scale.float()  # a learnable logit scale is usually kept in float32
    dout = torch.randn(B, N, C, device="cuda", dtype=dtype)
    got, want = _run(x, text, scale, dout)
    h_in = [t.detach().requires_grad_() for t in (x, text, scale)]
    xn = torch.nn.functional.normalize(h_in[0], dim=-1)
    tn = torch.nn.functional.normalize(h_in[1], dim=-1)
    h_out = h_in[2].to(dtype) * xn @ tn.t()
    h_out.backward(dout)
    budget = (h_out, *(t.grad for t in h_in))
    for name, g, w, h in zip(NAMES, got, want, budget):
        assert torch.isfinite(g).all(), name
        err, err_torch = max_err(g, w), max_err(h, w)
        assert err <= 2 * err_torch + 1e-3 * max(1.0, w.abs().max().item()), \
            f"{name}: error {err:.2e}, PyTorch {dtype}: {err_torch:.2e}"


@pytest.mark.gpu
def test_float32_gpu_large():
    torch.manual_seed(8)
    got, want = _run(*_inputs(8, 785, 512, 171, True, device="cuda"))
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, atol=1e-4, rtol=1e-3, name=name)
