"""The ops themselves, owned by no backend: their math, the forward-only specs of the baseline
attentions, and the key each call has in the auto table (`OpSpec`, `OPS`).

The math is plain PyTorch with the softmax written out, as the official code writes it: the
`reference` backend runs it, the fused backends are checked against it, and the baseline
attentions' gradients recompute it (`ForwardOnlyOp`). Half-precision inputs are computed in
float32, float64 in float64; it materialises the ``Nq x Nk`` score matrix, which the fused
backends exist to avoid.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ._library import NORM_EPS, ForwardOnlyOp, lse_dtype



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


# ---------------------------------------------------------------------------------------------
# The baseline attentions, as their official code writes them: the scores, an explicit softmax,
# then the product with v. Also the math the fused backends' backward recomputes (`ForwardOnlyOp`).
# ---------------------------------------------------------------------------------------------

def self_correlation_math(x: Tensor, v: Tensor, scale: float) -> Tensor:
    """ClearCLIP: ``softmax(s X X^T) V``."""
    xa, va = _acc(x, v)
    p = torch.softmax(torch.matmul(xa, xa.transpose(-2, -1)) * scale, dim=-1)
    return torch.matmul(p, va).to(v.dtype)


def self_correlation_sum_math(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """SCLIP: ``(softmax(s Q Q^T) + softmax(s K K^T)) V`` (rows of the map sum to 2)."""
    qa, ka, va = _acc(q, k, v)
    p = (torch.softmax(torch.matmul(qa, qa.transpose(-2, -1)) * scale, dim=-1)
         + torch.softmax(torch.matmul(ka, ka.transpose(-2, -1)) * scale, dim=-1))
    return torch.matmul(p, va).to(v.dtype)


def gaussian_bias(h: int, w: int, sigma: float, class_token: bool = True, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """NACLIP's neighbourhood term G ``[T, T]`` over T = h*w (+ 1) tokens: ``exp(-d^2 / (2
    sigma^2))`` with d the distance between two patches on the row-major grid (in patches), 0 on
    the class token's row and column. Cached, except while compiling (it is then part of the
    graph)."""
    build = _build_gaussian_bias if torch.compiler.is_compiling() else _gaussian_bias
    return build(h, w, sigma, class_token, device, dtype)


@functools.lru_cache(maxsize=32)
def _gaussian_bias(h: int, w: int, sigma: float, class_token: bool, device: str,
                   dtype: torch.dtype) -> Tensor:
    # a normal tensor even when first asked for under inference mode: an inference tensor in
    # the cache would fail every later call that autograd records (SDPA saves its mask)
    with torch.inference_mode(False):
        return _build_gaussian_bias(h, w, sigma, class_token, device, dtype)


def _build_gaussian_bias(h: int, w: int, sigma: float, class_token: bool, device: str,
                         dtype: torch.dtype) -> Tensor:
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    pos = torch.stack((r.flatten(), c.flatten()), dim=1)
    d2 = (pos[:, None, :] - pos[None, :, :]).pow(2).sum(-1)
    first = int(class_token)
    g = torch.zeros(h * w + first, h * w + first, dtype=torch.float64)
    g[first:, first:] = torch.exp(-d2 / (2 * sigma ** 2))
    return g.to(device=device, dtype=dtype)


def gaussian_self_correlation_math(x: Tensor, v: Tensor, scale: float, grid_h: int, grid_w: int,
                                   sigma: float, class_token: bool) -> Tensor:
    """NACLIP: ``softmax(s X X^T + G) V``, G of `gaussian_bias`."""
    xa, va = _acc(x, v)
    bias = gaussian_bias(grid_h, grid_w, sigma, class_token, str(x.device), xa.dtype)
    p = torch.softmax(torch.matmul(xa, xa.transpose(-2, -1)) * scale + bias, dim=-1)
    return torch.matmul(p, va).to(v.dtype)


def cosines(fa: Tensor) -> Tensor:
    """S ``[B, n, n]``: the cosine similarities of f's tokens, rows normalised as F.normalize
    (`NORM_EPS`), in fa's dtype (the callers pass float32 or float64: S decides masks)."""
    fn = torch.nn.functional.normalize(fa, dim=-1, eps=NORM_EPS)
    return torch.matmul(fn, fn.transpose(-2, -1))


def _affinity_map(fa: Tensor, beta: float, gamma: float) -> Tensor:
    """ProxyCLIP's map ``[B, n, n]`` of the features fa (float32 or float64)."""
    s = cosines(fa)
    a = gamma * (s - beta * s.mean(dim=(1, 2), keepdim=True))
    eye = torch.eye(a.shape[-1], dtype=torch.bool, device=a.device)
    return a.masked_fill((a < 0) & ~eye, float("-inf")).softmax(-1)


def _masked_affinity(fa: Tensor, va: Tensor, beta: float, gamma: float) -> Tensor:
    """ProxyCLIP's map applied to every head of va, in the accumulation dtype."""
    p = _affinity_map(fa, beta, gamma)
    # one product with every head's values side by side ([n, H*d]); a broadcast p @ v per head
    # would first copy p once per head
    B, H, n, d = va.shape
    out = torch.matmul(p, va.transpose(1, 2).reshape(B, n, H * d))
    return out.view(B, n, H, d).transpose(1, 2)


def masked_affinity_math(f: Tensor, v: Tensor, beta: float, gamma: float) -> Tensor:
    """ProxyCLIP: ``softmax(gamma (S - beta mean(S)))`` of the cosine affinities S of f
    ``[B, n, C]``, entries below 0 masked but the diagonal kept, applied to every head of v
    ``[B, H, n, d]``. mean(S) is per image (ProxyCLIP runs one crop at a time). S, its mean and
    the mask are float32 for half inputs (the mask is a discrete decision)."""
    return _masked_affinity(*_acc(f, v), beta, gamma).to(v.dtype)


def averaged_dual_softmax_math(f: Tensor, k: Tensor, v: Tensor, scale: float, beta: float,
                               gamma: float) -> Tensor:
    """SC-CLIP's last block: ``((P_mask + softmax(s K K^T)) / 2) V`` per head, P_mask ProxyCLIP's
    masked affinity of f (`masked_affinity_math`); S, its mean and the mask in float32 (float64
    for float64 inputs)."""
    fa, ka, va = _acc(f, k, v)
    pk = torch.softmax(torch.matmul(ka, ka.transpose(-2, -1)) * scale, dim=-1)
    # the maps averaged, then one product with v, as SC-CLIP's code does
    p = (_affinity_map(fa, beta, gamma).unsqueeze(1) + pk) / 2
    return torch.matmul(p, va).to(v.dtype)


SIMILARITY_EPS = 1e-6  # added to the row sums of W: a row of W may be all zeros (threshold > 1)


def similarity_aggregation_math(f: Tensor, x: Tensor, threshold: float) -> Tensor:
    """SC-CLIP's thresholded aggregation: ``W x / (rowsum(W) + 1e-6)`` with ``W = S [S >=
    threshold]``, S the cosines of f ``[B, N, C]``, x ``[B, N, D]``; S and the decision in
    float32 (float64 for float64 inputs)."""
    fa, xa = _acc(f, x)
    s = cosines(fa)
    w = torch.where(s >= threshold, s, torch.zeros((), dtype=s.dtype, device=s.device))
    out = torch.matmul(w, xa) / (w.sum(-1, keepdim=True) + SIMILARITY_EPS)
    return out.to(x.dtype)


SELF_CORRELATION = ForwardOnlyOp("self_correlation", "Tensor x, Tensor v, float scale",
                                 self_correlation_math)
SELF_CORRELATION_SUM = ForwardOnlyOp("self_correlation_sum", "Tensor q, Tensor k, Tensor v, float scale",
                                     self_correlation_sum_math)
GAUSSIAN_SELF_CORRELATION = ForwardOnlyOp(
    "gaussian_self_correlation",
    "Tensor x, Tensor v, float scale, int grid_h, int grid_w, float sigma, bool class_token",
    gaussian_self_correlation_math)
MASKED_AFFINITY = ForwardOnlyOp("masked_affinity_attention", "Tensor f, Tensor v, float beta, float gamma",
                                masked_affinity_math)
SIMILARITY_AGGREGATION = ForwardOnlyOp("similarity_aggregation", "Tensor f, Tensor x, float threshold",
                                       similarity_aggregation_math, heads=False)
AVERAGED_DUAL_SOFTMAX = ForwardOnlyOp(
    "averaged_dual_softmax", "Tensor f, Tensor k, Tensor v, float scale, float beta, float gamma",
    averaged_dual_softmax_math)
BASELINE_OPS = (SELF_CORRELATION, SELF_CORRELATION_SUM, GAUSSIAN_SELF_CORRELATION, MASKED_AFFINITY,
                SIMILARITY_AGGREGATION, AVERAGED_DUAL_SOFTMAX)


# ---------------------------------------------------------------------------------------------
# Each call's key in the auto table: (dim, forward FLOPs), the dim being the op's width
# ---------------------------------------------------------------------------------------------

def attention_key(B: int, H: int, Nq: int, Nk: int, d: int) -> tuple[int, int]:
    """(dim, forward FLOPs) of an attention call."""
    return d, 4 * B * H * Nq * Nk * d


def patch_text_logits_key(B: int, N: int, C: int, E: int) -> tuple[int, int]:
    """(dim, forward FLOPs) of a patch_text_logits call."""
    return E, 2 * B * N * C * E


def self_correlation_key(B: int, H: int, N: int, d: int) -> tuple[int, int]:
    """(head dim, forward FLOPs) of softmax(s X X^T) V, with or without NACLIP's bias: one
    attention of N x N per head."""
    return d, 4 * B * H * N * N * d


def self_correlation_sum_key(B: int, H: int, N: int, d: int) -> tuple[int, int]:
    """(head dim, forward FLOPs) of SCLIP's (softmax(s QQ^T) + softmax(s KK^T)) V: two score
    products and one product of the summed map with V, as written. (The fused kernels do a
    second value product, 8 N^2 d in all: each softmax's normaliser is known only at the end.)"""
    return d, 6 * B * H * N * N * d


def masked_affinity_key(B: int, n: int, C: int, H: int, d: int) -> tuple[int, int]:
    """(head dim, forward FLOPs) of ProxyCLIP's attention, its algorithmic minimum: the
    affinities once per image, the same for every head, and symmetric (S_ij = S_ji: n (n + 1)
    / 2 distinct dot products of length C, n (n + 1) C FLOPs), then one n x n map applied to all
    H heads of v (2 n^2 H d)."""
    return d, B * (n * (n + 1) * C + 2 * n * n * H * d)


def similarity_aggregation_key(B: int, N: int, C: int, D: int) -> tuple[int, int]:
    """(D, forward FLOPs) of SC-CLIP's aggregation: S once per image (2 N^2 C), then W x (2 N^2 D)."""
    return D, 2 * B * N * N * (C + D)


def averaged_dual_softmax_key(B: int, N: int, C: int, H: int, d: int) -> tuple[int, int]:
    """(head dim, forward FLOPs) of SC-CLIP's last block at its algorithmic minimum: S once per
    image (2 N^2 C), K K^T per head (2 N^2 d) and one product of the averaged map with V (2 N^2 d).
    (The fused kernels apply each softmax to V on its own, 2 N^2 d more: their normalisers are
    known only at the end.)"""
    return d, 2 * B * N * N * (C + 2 * H * d)


@dataclass(frozen=True)
class OpSpec:
    """What every backend of an op shares.

    sizes: the names of the sizes `key` takes (a benchmark case's shape holds them);
    key: sizes -> (dim, forward FLOPs), the call's key in the auto table;
    call_sizes: the call's tensors -> those sizes;
    dim_of: which of the call's tensors holds dim as its last size (read without `key`, which
        only `auto` needs);
    head_dim: whether dim is a head dim (checked against each backend's head-dim limits);
    layout: whether the op takes ``layout=`` (its output may be ``[B, N, H, d]``);
    forward_only: the baseline attentions' spec (math and recomputed backward).
    """

    name: str
    sizes: tuple[str, ...]
    key: Callable[..., tuple[int, int]]
    call_sizes: Callable[..., tuple[int, ...]]
    dim_of: int = 0
    head_dim: bool = True
    layout: bool = True
    forward_only: Optional[ForwardOnlyOp] = None

    def call_key(self, tensors: tuple[Tensor, ...]) -> tuple[int, int]:
        """(dim, forward FLOPs) of a call on `tensors`."""
        return self.key(*self.call_sizes(*tensors))


# the sizes `key` takes, read off a call's tensors (each shape read once: this runs on every
# call with backend="auto")
def _attention_sizes(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
    B, H, Nq, d = q.shape
    return B, H, Nq, k.shape[2], d


def _logits_sizes(x: Tensor, text: Tensor, logit_scale: Tensor) -> tuple[int, ...]:
    B, N, E = x.shape
    return B, N, text.shape[0], E


def _heads(*tensors: Tensor) -> tuple[int, ...]:
    return tuple(tensors[0].shape)


OPS = {spec.name: spec for spec in (
    OpSpec("attention", ("B", "H", "Nq", "Nk", "d"), attention_key, _attention_sizes),
    OpSpec("patch_text_logits", ("B", "N", "C", "E"), patch_text_logits_key, _logits_sizes,
           head_dim=False, layout=False),
    OpSpec("self_correlation", ("B", "H", "N", "d"), self_correlation_key, _heads,
           forward_only=SELF_CORRELATION),
    OpSpec("self_correlation_sum", ("B", "H", "N", "d"), self_correlation_sum_key, _heads,
           forward_only=SELF_CORRELATION_SUM),
    OpSpec("gaussian_self_correlation", ("B", "H", "N", "d"), self_correlation_key, _heads,
           forward_only=GAUSSIAN_SELF_CORRELATION),
    OpSpec("masked_affinity_attention", ("B", "n", "C", "H", "d"), masked_affinity_key,
           lambda f, v: (*f.shape, v.shape[1], v.shape[3]), dim_of=1, forward_only=MASKED_AFFINITY),
    OpSpec("similarity_aggregation", ("B", "N", "C", "D"), similarity_aggregation_key,
           lambda f, x: (*f.shape, x.shape[2]), dim_of=1, head_dim=False, layout=False,
           forward_only=SIMILARITY_AGGREGATION),
    OpSpec("averaged_dual_softmax", ("B", "N", "C", "H", "d"), averaged_dual_softmax_key,
           lambda f, k, v: (*f.shape, k.shape[1], k.shape[3]), dim_of=1, layout=False,
           forward_only=AVERAGED_DUAL_SOFTMAX),
)}
