"""Fresh random inputs (strided views included) and the float64 ground truth of the two hot ops."""
from __future__ import annotations

import torch

# the device the Triton tests run on: the GPU, else the CPU under the Triton interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AWKWARD_N = (1, 7, 197, 785)  # no block size divides them (ViT-B/16 at 224 and 448: 197, 785)


def make_qkv(B, H, Nq, Nk, d, *, dtype=torch.float32, device="cpu", strided=False,
             requires_grad=False, generator=None):
    """q [B,H,Nq,d], k/v [B,H,Nk,d]; strided=True gives non-contiguous views (as from a
    fused qkv projection: [B, N, H, d] transposed)."""
    def one(n):
        if strided:
            base = torch.randn(B, n, H, 2 * d, dtype=torch.float64, generator=generator)
            t = base.to(device=device, dtype=dtype)[..., ::2].transpose(1, 2)
            assert not t.is_contiguous() and t.stride(-1) == 2
        else:
            t = torch.randn(B, H, n, d, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad) if requires_grad else t
    return one(Nq), one(Nk), one(Nk)


def attention_f64(q, k, v, scale=None):
    """Independent float64 attention with torch autograd, the ground truth of every test."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


def patch_text_logits_f64(x, text, logit_scale):
    x, text = x.double(), text.double()
    scale = logit_scale.double() if isinstance(logit_scale, torch.Tensor) else logit_scale
    xn = x / x.norm(dim=-1, keepdim=True)
    tn = text / text.norm(dim=-1, keepdim=True)
    return scale * xn @ tn.t()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close(actual, expected, *, atol, rtol, name):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")
