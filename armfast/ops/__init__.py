"""The fused ops of armfast, one entry point each; `backend=` picks the implementation.

- `attention(q, k, v, *, scale=None, backend="auto", layout="bhnd")`: softmax(q k^T * scale) v.
- `patch_text_logits(x, text, *, logit_scale=1.0, backend="auto")`:
  logit_scale * normalize(x) @ normalize(text)^T.

The attentions of the training-free baselines' last block, fused where SDPA cannot go (forward
kernels; gradients recompute the reference math):

- `self_correlation(x, v)`: softmax(s x x^T) v (ClearCLIP's q-q attention, or k-k);
- `self_correlation_sum(q, k, v)`: (softmax(s q q^T) + softmax(s k k^T)) v (SCLIP);
- `gaussian_self_correlation(x, v, grid=(h, w))`: softmax(s x x^T + G) v, G a Gaussian of the
  patches' grid distance (NACLIP);
- `masked_affinity_attention(f, v)`: softmax(gamma (S - beta mean S)), S = cos(f_i, f_j), entries
  below 0 masked, applied to every head of v (ProxyCLIP).

Each call validates its arguments, resolves the backend (cached per kind of call) and runs the
backend's eager fast path; under `torch.compile`/`torch.export` it runs the backend's
`torch.library` custom ops instead (see `armfast.ops._library`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _auto, _registry, _validate
from ._registry import BACKENDS, available_backends, resolve, status

__all__ = ["attention", "patch_text_logits", "self_correlation", "self_correlation_sum",
           "gaussian_self_correlation", "masked_affinity_attention", "available_backends",
           "backend_status", "BACKENDS", "resolve_backend", "auto_choice"]

_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
              backend: str = "auto", layout: str = "bhnd") -> Tensor:
    """Multi-head attention ``softmax(q k^T * scale) v``.

    q: ``[B, H, Nq, d]``; k, v: ``[B, H, Nk, d]`` (Nq may differ from Nk); strided views are
    fine. ``scale`` defaults to ``d ** -0.5``. Returns ``[B, H, Nq, d]`` in q's dtype, or with
    ``layout="bnhd"`` ``[B, Nq, H, d]`` (the fused backends write it contiguous, so
    ``out.flatten(2)`` merges the heads without a copy). Gradients flow to q, k and v.
    """
    scale = _validate.attention_args(q, k, v, scale)
    heads_last = layout != "bhnd" and _validate.heads_last(layout)
    B, H, Nq, d = q.shape
    train = work = None
    if backend == "auto":  # the table's key: gradients needed or not, and the size of the work
        train = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        work = _auto.attention_key(B, H, Nq, k.shape[2], d)[1]
    if _is_compiling():
        name = _backend_name("attention", backend, q.dtype, q.device, _traced_int(d), _traced_int(d), train,
                             _traced_bucket(work))
        return _registry.load(name).attention.compiled(q, k, v, scale, heads_last)
    impl = resolve("attention", backend, q.dtype, q.device, dim=d, head_dim=d, train=train,
                   bucket=work and _auto.bucket(work)).attention
    return impl(q, k, v, scale, heads_last)


def patch_text_logits(x: Tensor, text: Tensor, *, logit_scale: float | Tensor = 1.0,
                      backend: str = "auto") -> Tensor:
    """Cosine logits ``logit_scale * normalize(x) @ normalize(text)^T``.

    x: ``[B, N, E]`` patch features; text: ``[C, E]`` class embeddings; logit_scale: a number
    or a one-element tensor (gradients flow to it). Returns ``[B, N, C]`` in x's dtype.
    """
    scale = _validate.patch_text_logits_args(x, text, logit_scale)
    B, N, E = x.shape
    train = work = None
    if backend == "auto":
        train = _grad_enabled() and (x.requires_grad or text.requires_grad or scale.requires_grad)
        work = _auto.patch_text_logits_key(B, N, text.shape[0], E)[1]
    if _is_compiling():
        name = _backend_name("patch_text_logits", backend, x.dtype, x.device, _traced_int(E), None, train,
                             _traced_bucket(work))
        return _registry.load(name).patch_text_logits.compiled(x, text, scale)
    impl = resolve("patch_text_logits", backend, x.dtype, x.device, dim=E, train=train,
                   bucket=work and _auto.bucket(work)).patch_text_logits
    return impl(x, text, scale)


def self_correlation(x: Tensor, v: Tensor, *, scale: float | None = None, backend: str = "auto",
                     layout: str = "bhnd") -> Tensor:
    """Self-correlation attention ``softmax(x x^T * scale) v``: ClearCLIP's query-query attention
    (x = q), or key-key (x = k).

    x, v: ``[B, H, N, d]`` (strided views are fine); ``scale`` defaults to ``d ** -0.5``. Returns
    ``[B, H, N, d]`` in x's dtype, or ``[B, N, H, d]`` with ``layout="bnhd"``.
    """
    _validate.same_shape_heads(("x", "v"), (x, v))
    scale = _validate.softmax_scale(scale, x.shape[-1])
    return _baseline_op("self_correlation", backend, layout, (x, v), (x, v, scale),
                        _auto.self_correlation_key(*x.shape))


def self_correlation_sum(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                         backend: str = "auto", layout: str = "bhnd") -> Tensor:
    """SCLIP's correlative attention ``(softmax(q q^T * scale) + softmax(k k^T * scale)) v`` (rows
    of the summed map add up to 2); the fused backends run both softmaxes in one pass over the
    key tiles and read v once.

    q, k, v: ``[B, H, N, d]``; otherwise as `self_correlation`.
    """
    _validate.same_shape_heads(("q", "k", "v"), (q, k, v))
    scale = _validate.softmax_scale(scale, q.shape[-1])
    return _baseline_op("self_correlation_sum", backend, layout, (q, k, v), (q, k, v, scale),
                        _auto.self_correlation_sum_key(*q.shape))


def gaussian_self_correlation(x: Tensor, v: Tensor, *, grid: tuple[int, int], sigma: float = 5.0,
                              class_token: bool = True, scale: float | None = None,
                              backend: str = "auto", layout: str = "bhnd") -> Tensor:
    """NACLIP's neighbourhood attention ``softmax(x x^T * scale + G) v``.

    The tokens are the patches of an ``grid = (h, w)`` grid in row-major order, after a class
    token when ``class_token`` (so N = h*w + 1, else h*w). ``G_ij = exp(-dist(i, j)^2 / (2
    sigma^2))`` with dist the distance of the two patches on the grid, in patches, and 0 on the
    class token's row and column; the fused backends compute it from the token indices, so no
    N x N tensor exists. x, v: ``[B, H, N, d]``; otherwise as `self_correlation`.
    """
    _validate.same_shape_heads(("x", "v"), (x, v))
    h, w, sigma, class_token = _validate.grid_args(grid, sigma, class_token, x.shape[2])
    scale = _validate.softmax_scale(scale, x.shape[-1])
    return _baseline_op("gaussian_self_correlation", backend, layout, (x, v),
                        (x, v, scale, h, w, sigma, class_token), _auto.self_correlation_key(*x.shape))


def masked_affinity_attention(f: Tensor, v: Tensor, *, beta: float = 1.2, gamma: float = 3.0,
                              backend: str = "auto", layout: str = "bhnd") -> Tensor:
    """ProxyCLIP's attention: ``softmax(gamma (S - beta mean(S)))`` applied to every head of v.

    f: ``[B, n, C]`` patch features of a vision foundation model (any norm); S their cosine
    affinities ``[n, n]`` per image and mean(S) its mean over all n x n pairs; entries of
    ``gamma (S - beta mean(S))`` below 0 are masked, the diagonal never. v: ``[B, H, n, d]``.
    Returns ``[B, H, n, d]`` in v's dtype, or ``[B, n, H, d]`` with ``layout="bnhd"``. The fused
    backends take mean(S) = ``|mean_i f_i / |f_i||^2`` from an O(n C) first pass and keep no
    n x n map. gamma must be > 0.
    """
    beta, gamma = _validate.affinity_args(f, v, beta, gamma)
    B, n, C = f.shape
    return _baseline_op("masked_affinity_attention", backend, layout, (f, v), (f, v, beta, gamma),
                        _auto.masked_affinity_key(B, n, C, v.shape[1], v.shape[3]))


def _baseline_op(op: str, backend: str, layout: str, tensors: tuple[Tensor, ...], args: tuple,
                 key: tuple[int, int]) -> Tensor:
    """Resolves and runs a baseline op; `key` is its (dim, forward FLOPs) in the auto table."""
    heads_last = layout != "bhnd" and _validate.heads_last(layout)
    x = tensors[0]
    dim, work = key
    train = bucket = None
    if backend == "auto":
        train = _grad_enabled() and any(t.requires_grad for t in tensors)
        bucket = work
    if _is_compiling():
        d = _traced_int(dim)
        name = _backend_name(op, backend, x.dtype, x.device, d, d, train, _traced_bucket(bucket))
        return _registry.load(name).ops[op].compiled(*args, heads_last)
    impl = resolve(op, backend, x.dtype, x.device, dim=dim, head_dim=dim, train=train,
                   bucket=bucket and _auto.bucket(bucket)).ops[op]
    return impl(*args, heads_last)


def _largest(ok, low: int, high: int) -> int:
    """The largest i in [low, high] with ok(i), for ok true up to some point and false after."""
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if ok(mid) else (low, mid - 1)
    return low


def _traced_bucket(work) -> int | None:
    """`_auto.bucket(work)` by comparisons alone. While tracing with dynamic shapes each one is
    a guard on the sizes, so a compiled graph is specialised on the size bucket (the table's
    key), not on the exact size."""
    return None if work is None else _largest(lambda b: work >= 4 ** b, 0, 62)


def _traced_int(n) -> int:
    """A (possibly symbolic) size as a Python int while tracing, by comparisons (guards)."""
    return _largest(lambda i: n >= i, 1, 2 ** 31)


@torch.compiler.assume_constant_result
def _backend_name(op, backend, dtype, device, dim, head_dim, train, bucket) -> str:
    """`resolve` for torch.compile: run once while tracing (it may import a backend or read the
    auto table), its answer kept as a constant of the graph."""
    return resolve(op, backend, dtype, device, dim=dim, head_dim=head_dim, train=train,
                   bucket=bucket).name


def resolve_backend(op: str, backend: str, tensor: Tensor, *, train: bool = False,
                    work: int = 0) -> str:
    """The backend name that `backend` (possibly "auto") resolves to for an `op` call whose
    input `tensor` holds the op's dim last (q of attention, x of patch_text_logits, v of the
    baseline attentions), needing gradients (`train`) or not, of `work` forward FLOPs."""
    dim = tensor.shape[-1]
    head_dim = None if op == "patch_text_logits" else dim
    return resolve(op, backend, tensor.dtype, tensor.device, dim=dim, head_dim=head_dim,
                   train=train, bucket=_auto.bucket(work)).name


def auto_choice(op: str, device: str | torch.device, dtype: torch.dtype, dim: int, *,
                train: bool, work: int) -> _auto.Choice:
    """What the auto table says for such a call, and why (before availability is checked)."""
    return _auto.lookup(op, torch.device(device), dtype, dim, train, _auto.bucket(work))


def backend_status(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Every backend -> None when usable on `device`, else why not."""
    return status(device)
