"""`sdpa` backend: PyTorch's own fused attention, the strongest off-the-shelf peer.

`scaled_dot_product_attention` is an aten op with its own autograd and fake kernels, so it is
called as is. For `patch_text_logits` there is no fused PyTorch op; this backend is the plain
autograd composition (`F.normalize` and a matmul), i.e. what a user would write.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _affinity
from .._library import NORM_EPS, plain
from .._limits import ANY_DTYPE, Limits
from .._registry import Backend
from .._specs import SIMILARITY_EPS, gaussian_bias


@plain
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, heads_last: bool = False) -> Tensor:
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    # a view; on CUDA the flash and cuDNN kernels already store [B, N, H, d], so it is contiguous
    return out.transpose(1, 2) if heads_last else out


@plain
def patch_text_logits(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    xn = F.normalize(x, dim=-1, eps=NORM_EPS)
    tn = F.normalize(text, dim=-1, eps=NORM_EPS)
    return logit_scale.to(x.dtype) * torch.matmul(xn, tn.t())


# ---- the baseline attentions: the best compositions of SDPA calls --------------------------

def _layout(out: Tensor, heads_last: bool) -> Tensor:
    return out.transpose(1, 2) if heads_last else out


@plain
def self_correlation(x: Tensor, v: Tensor, scale: float, heads_last: bool = False) -> Tensor:
    return _layout(F.scaled_dot_product_attention(x, x, v, scale=scale), heads_last)


@plain
def self_correlation_sum(q: Tensor, k: Tensor, v: Tensor, scale: float,
                         heads_last: bool = False) -> Tensor:
    out = (F.scaled_dot_product_attention(q, q, v, scale=scale)
           + F.scaled_dot_product_attention(k, k, v, scale=scale))
    return _layout(out, heads_last)


@plain
def gaussian_self_correlation(x: Tensor, v: Tensor, scale: float, grid_h: int, grid_w: int,
                              sigma: float, class_token: bool, heads_last: bool = False) -> Tensor:
    bias = gaussian_bias(grid_h, grid_w, sigma, class_token, str(x.device), x.dtype)
    return _layout(F.scaled_dot_product_attention(x, x, v, attn_mask=bias, scale=scale), heads_last)


def _affinity_heads_last(f: Tensor, v: Tensor, beta: float, gamma: float) -> Tensor:
    """ProxyCLIP's map applied to every head of v, ``[B, n, H, d]``: one SDPA over the n x n
    boolean mask (which needs S itself), all heads of v side by side as one value of width H*d,
    since the map is shared by every head. S, its mean and the mask are float32 whatever f's dtype
    (`_affinity`); SDPA's scores may round, the mask may not."""
    rnorm, thresh = _affinity.first_pass(f, beta)
    with torch.no_grad():  # a mask has no gradient: record nothing for it
        keep = _affinity.keep_mask(_affinity.affinities(f, rnorm), thresh)
    fn = _affinity.normalized(f, rnorm).to(f.dtype).unsqueeze(1)
    B, H, n, d = v.shape
    values = v.transpose(1, 2).reshape(B, 1, n, H * d)
    out = F.scaled_dot_product_attention(fn, fn, values, attn_mask=keep.unsqueeze(1), scale=gamma)
    return out.view(B, n, H, d)


@plain
def masked_affinity_attention(f: Tensor, v: Tensor, beta: float, gamma: float,
                              heads_last: bool = False) -> Tensor:
    out = _affinity_heads_last(f, v, beta, gamma)  # [B, n, H, d]: heads last already
    return out if heads_last else out.transpose(1, 2)


@plain
def averaged_dual_softmax(f: Tensor, k: Tensor, v: Tensor, scale: float, beta: float, gamma: float,
                          heads_last: bool = False) -> Tensor:
    """Two SDPA calls, the masked affinity (`_affinity_heads_last`) and k-k, averaged: applying
    each map to v on its own is the same product as applying their mean."""
    both = torch.add(F.scaled_dot_product_attention(k, k, v, scale=scale),
                     _affinity_heads_last(f, v, beta, gamma).transpose(1, 2))
    return _layout(both.mul_(0.5), heads_last)


@plain
def similarity_aggregation(f: Tensor, x: Tensor, threshold: float,
                           heads_last: bool = False) -> Tensor:
    """S in float32 (float64 for float64), thresholded in place; W x in x's dtype (tensor cores
    on GPUs), divided by W's float32 row sums."""
    w = _affinity.affinities(f)
    w.masked_fill_(w < threshold, 0)  # in place: the product saves its inputs, not w
    out = torch.matmul(w.to(x.dtype), x)
    return (out / (w.sum(-1, keepdim=True) + SIMILARITY_EPS)).to(x.dtype)


BACKEND = Backend(
    name="sdpa",
    ops={"attention": attention, "patch_text_logits": patch_text_logits,
         "self_correlation": self_correlation, "self_correlation_sum": self_correlation_sum,
         "gaussian_self_correlation": gaussian_self_correlation,
         "masked_affinity_attention": masked_affinity_attention,
         "similarity_aggregation": similarity_aggregation,
         "averaged_dual_softmax": averaged_dual_softmax},
    limits=Limits({device: ANY_DTYPE for device in ("cpu", "cuda", "mps", "xpu")}),
)
