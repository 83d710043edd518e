"""Every bad input names the argument and says what was expected."""
import pytest
import torch

from armfast import ops


def qkv(*, nq=4, nk=5, d=8):
    return torch.randn(1, 2, nq, d), torch.randn(1, 2, nk, d), torch.randn(1, 2, nk, d)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda q, k, v: ([1.0], k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D \[B, H, N, d\]"),
    (lambda q, k, v: (q, k.long(), v), TypeError, "k must be a floating-point"),
    (lambda q, k, v: (q, k, v.double()), TypeError, "v must have the dtype of q"),
    (lambda q, k, v: (q, k[:, :1], v), ValueError, "share batch and head dims"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "v must have as many tokens as k"),
    (lambda q, k, v: (q, k[..., :4], v), ValueError, "head dim"),
    (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "q must have no empty dimension"),
])
def test_attention_bad_tensors(mutate, error, match):
    with pytest.raises(error, match=match):
        ops.attention(*mutate(*qkv()), backend="reference")


@pytest.mark.parametrize("scale,error,match", [
    ("0.5", TypeError, "scale must be a real number"),
    (True, TypeError, "scale must be a real number"),
    (float("nan"), ValueError, "scale must be finite"),
    (-1.0, ValueError, "scale must be finite and > 0"),
])
def test_attention_bad_scale(scale, error, match):
    with pytest.raises(error, match=match):
        ops.attention(*qkv(), scale=scale)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.attention(*qkv(), backend="flash")
    with pytest.raises(TypeError, match="backend must be a string"):
        ops.patch_text_logits(torch.randn(1, 2, 3), torch.randn(4, 3), backend=None)


def test_backend_on_wrong_device_says_why():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        ops.attention(*qkv(), backend="cuda")


@pytest.mark.parametrize("x,text,scale,error,match", [
    (torch.randn(2, 3), torch.randn(4, 3), 1.0, ValueError, r"x must be 3-D \[B, N, E\]"),
    (torch.randn(1, 2, 3), torch.randn(4, 3, 1), 1.0, ValueError, r"text must be 2-D \[C, E\]"),
    (torch.randn(1, 2, 3), torch.randn(4, 5), 1.0, ValueError, "text must have x's embedding dim E=3"),
    (torch.randn(1, 2, 3), torch.randn(4, 3).half(), 1.0, TypeError, "text must have the dtype of x"),
    (torch.randn(1, 2, 3), torch.randn(4, 3), torch.ones(2), ValueError, "logit_scale must be a number or a one-element"),
    (torch.randn(1, 2, 3), torch.randn(4, 3), torch.ones(1, dtype=torch.long), TypeError, "logit_scale must be a floating-point"),
    (torch.randn(1, 2, 3), torch.randn(4, 3), "40", TypeError, "logit_scale must be a real number"),
    (torch.randn(1, 2, 3), torch.randn(4, 3), float("inf"), ValueError, "logit_scale must be finite"),
])
def test_patch_text_logits_bad_inputs(x, text, scale, error, match):
    with pytest.raises(error, match=match):
        ops.patch_text_logits(x, text, logit_scale=scale, backend="reference")


def test_auto_with_unsupported_dtype_is_a_type_error():
    q = torch.randn(1, 1, 2, 4).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="no backend can run attention on cpu with dtype float8"):
        ops.attention(q, q, q)


def test_sparse_input_is_refused():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(TypeError, match="q must be a dense"):
        ops.attention(q.to_sparse(), q, q)
