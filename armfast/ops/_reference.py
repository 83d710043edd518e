"""`reference` backend: plain PyTorch with the softmax written out, the ground truth.

Half-precision inputs are computed in float32, float64 in float64. It materialises the
``Nq x Nk`` score matrix; the fused backends exist to avoid exactly that.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._library import define_attention, define_patch_text_logits, lse_dtype
from ._registry import ANY_DTYPE, Backend

NORM_EPS = 1e-12  # as in torch.nn.functional.normalize


def _acc(*ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(lse_dtype(t.dtype)) for t in ts)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> Tensor:
    qa, ka, va = _acc(q, k, v)
    s = torch.matmul(qa, ka.transpose(-2, -1)) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out.copy_(torch.matmul(p, va))
    return lse


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    qa, ka, va, da, oa = _acc(q, k, v, dout, out)
    p = torch.exp(torch.matmul(qa, ka.transpose(-2, -1)) * scale - lse.unsqueeze(-1))
    dv = torch.matmul(p.transpose(-2, -1), da)
    dp = torch.matmul(da, va.transpose(-2, -1))
    delta = (da * oa).sum(-1, keepdim=True)  # rowsum(dO * O) == rowsum(P * dP)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, ka) * scale
    dk = torch.matmul(ds.transpose(-2, -1), qa) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _normalize(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    norm = t.norm(dim=-1, keepdim=True)
    r = norm.clamp_min(NORM_EPS)
    return t / r, r, (norm >= NORM_EPS).to(t.dtype)


def patch_text_logits_forward(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    xa, ta, sa = _acc(x, text, logit_scale)
    xn, _, _ = _normalize(xa)
    tn, _, _ = _normalize(ta)
    return (sa * torch.matmul(xn, tn.t())).to(x.dtype)


def patch_text_logits_backward(dout: Tensor, x: Tensor, text: Tensor, logit_scale: Tensor,
                               text_grad: bool = True) -> tuple[Tensor, Optional[Tensor], Tensor]:
    xa, ta, sa, g = _acc(x, text, logit_scale, dout)
    xn, rx, mx = _normalize(xa)
    tn, rt, mt = _normalize(ta)
    gt = torch.matmul(g, tn)  # dL/d normalize(x), before the scale
    dscale = (gt * xn).sum()  # sum(g * cos) without recomputing cos
    gxn = sa * gt
    # d(t / |t|) = (g - t_hat <g, t_hat>) / |t|; below the eps clamp the norm is constant.
    dx = (gxn - mx * xn * (gxn * xn).sum(-1, keepdim=True)) / rx
    dt = None
    if text_grad:
        gtn = sa * torch.einsum("bnc,bne->ce", g, xn)  # dL/d normalize(text)
        dt = ((gtn - mt * tn * (gtn * tn).sum(-1, keepdim=True)) / rt).to(text.dtype)
    return dx.to(x.dtype), dt, dscale.to(logit_scale.dtype).reshape(logit_scale.shape)


BACKEND = Backend(
    name="reference",
    ops={"attention": define_attention("reference", attention_forward, attention_backward),
         "patch_text_logits": define_patch_text_logits(
             "reference", patch_text_logits_forward, patch_text_logits_backward)},
    dtypes={device: ANY_DTYPE for device in ("cpu", "cuda", "mps", "xpu")},
)
