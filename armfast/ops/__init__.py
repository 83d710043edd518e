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
  below 0 masked, applied to every head of v (ProxyCLIP);
- `similarity_aggregation(f, x, threshold=0.4)`: W x / (rowsum(W) + 1e-6), W = S [S >= threshold]
  (SC-CLIP's aggregation);
- `averaged_dual_softmax(f, k, v)`: ((P_mask + softmax(s k k^T)) / 2) v, P_mask ProxyCLIP's masked
  affinity (SC-CLIP's last block).

Each call validates its arguments and goes through one dispatch (`armfast.ops._dispatch`): it
resolves the backend (cached per kind of call) and runs the backend's eager fast path; under
`torch.compile`/`torch.export` it runs the backend's `torch.library` custom ops instead (see
`armfast.ops._library`). `explain` says, for a call as written at its call site, which backend
runs it and why each other one does not.

Where things live: `_specs` (each op's math, its forward-only spec and its auto-table key, owned
by no backend), `_dispatch`, `_registry` (backends, their reasons, `auto`'s order), `_auto` (the
measured table), `_limits` (each backend's dtypes and head dims), `_library` (autograd and
custom-op plumbing), `_validate` (argument errors), `_backends/<name>` (one module per backend).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _auto, _dispatch, _validate
from ._registry import BACKENDS, Candidate, Explanation, available_backends, resolve, status
from ._specs import OPS

__all__ = ["attention", "patch_text_logits", "self_correlation", "self_correlation_sum",
           "gaussian_self_correlation", "masked_affinity_attention", "similarity_aggregation",
           "averaged_dual_softmax", "available_backends",
           "backend_status", "BACKENDS", "resolve_backend", "auto_choice", "explain",
           "Explanation", "Candidate"]

_run = _dispatch.run
_ATTENTION, _LOGITS = OPS["attention"], OPS["patch_text_logits"]


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
              backend: str = "auto", layout: str = "bhnd") -> Tensor:
    """Multi-head attention ``softmax(q k^T * scale) v``.

    q: ``[B, H, Nq, d]``; k, v: ``[B, H, Nk, d]`` (Nq may differ from Nk); strided views are
    fine. ``scale`` defaults to ``d ** -0.5``. Returns ``[B, H, Nq, d]`` in q's dtype, or with
    ``layout="bnhd"`` ``[B, Nq, H, d]`` (the fused backends write it contiguous, so
    ``out.flatten(2)`` merges the heads without a copy). Gradients flow to q, k and v.
    """
    scale = _validate.attention_args(q, k, v, scale)
    return _run(_ATTENTION, backend, layout, (q, k, v), (q, k, v, scale))


def patch_text_logits(x: Tensor, text: Tensor, *, logit_scale: float | Tensor = 1.0,
                      backend: str = "auto") -> Tensor:
    """Cosine logits ``logit_scale * normalize(x) @ normalize(text)^T``.

    x: ``[B, N, E]`` patch features; text: ``[C, E]`` class embeddings; logit_scale: a number
    or a one-element tensor (gradients flow to it). Returns ``[B, N, C]`` in x's dtype.
    """
    scale = _validate.patch_text_logits_args(x, text, logit_scale)
    return _run(_LOGITS, backend, None, (x, text, scale), (x, text, scale))


def self_correlation(x: Tensor, v: Tensor, *, scale: float | None = None, backend: str = "auto",
                     layout: str = "bhnd") -> Tensor:
    """Self-correlation attention ``softmax(x x^T * scale) v``: ClearCLIP's query-query attention
    (x = q), or key-key (x = k).

    x, v: ``[B, H, N, d]`` (strided views are fine); ``scale`` defaults to ``d ** -0.5``. Returns
    ``[B, H, N, d]`` in x's dtype, or ``[B, N, H, d]`` with ``layout="bnhd"``.
    """
    _validate.same_shape_heads(("x", "v"), (x, v))
    scale = _validate.softmax_scale(scale, x.shape[-1])
    return _run(OPS["self_correlation"], backend, layout, (x, v), (x, v, scale))


def self_correlation_sum(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                         backend: str = "auto", layout: str = "bhnd") -> Tensor:
    """SCLIP's correlative attention ``(softmax(q q^T * scale) + softmax(k k^T * scale)) v`` (rows
    of the summed map add up to 2); the fused backends run both softmaxes in one pass over the
    key tiles and read v once.

    q, k, v: ``[B, H, N, d]``; otherwise as `self_correlation`.
    """
    _validate.same_shape_heads(("q", "k", "v"), (q, k, v))
    scale = _validate.softmax_scale(scale, q.shape[-1])
    return _run(OPS["self_correlation_sum"], backend, layout, (q, k, v), (q, k, v, scale))


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
    return _run(OPS["gaussian_self_correlation"], backend, layout, (x, v),
                (x, v, scale, h, w, sigma, class_token))


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
    return _run(OPS["masked_affinity_attention"], backend, layout, (f, v), (f, v, beta, gamma))


def similarity_aggregation(f: Tensor, x: Tensor, *, threshold: float = 0.4,
                           backend: str = "auto") -> Tensor:
    """SC-CLIP's thresholded similarity aggregation ``W x / (rowsum(W) + 1e-6)``.

    f: ``[B, N, C]`` features (any norm); S ``[N, N]`` their cosine similarities per image (rows
    normalised as F.normalize); ``W = S * [S >= threshold]``. x: ``[B, N, D]``, of f's dtype and
    device. Returns ``[B, N, D]`` in x's dtype. S and the decision ``S >= threshold`` are
    computed in float32 (float64 for float64 inputs) by every backend, so no backend flips a
    pair another keeps; the fused backends keep no N x N map. threshold must be finite and >= 0.
    """
    threshold = _validate.similarity_args(f, x, threshold)
    return _run(OPS["similarity_aggregation"], backend, None, (f, x), (f, x, threshold, False))


def averaged_dual_softmax(f: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                          gamma: float = 3.0, beta: float = 1.0, backend: str = "auto") -> Tensor:
    """SC-CLIP's last-block attention ``((P_mask + softmax(scale k k^T)) / 2) v`` per head.

    P_mask is `masked_affinity_attention`'s map: ``softmax(gamma (S - beta mean(S)))`` with S the
    cosine similarities of f's tokens, mean(S) one per image over all N x N entries, entries below
    0 masked but the diagonal kept. f: ``[B, N, C]``; k, v: ``[B, H, N, d]`` (strided views are
    fine); ``scale`` defaults to ``d ** -0.5``; gamma must be > 0. Returns ``[B, H, N, d]`` in v's
    dtype. S, its mean and the mask are computed in float32 (float64 for float64 inputs) by
    every backend; the fused backends keep no N x N map.
    """
    scale, beta, gamma = _validate.dual_softmax_args(f, k, v, scale, beta, gamma)
    return _run(OPS["averaged_dual_softmax"], backend, None, (f, k, v),
                (f, k, v, scale, beta, gamma, False))


def resolve_backend(op: str, backend: str, tensor: Tensor, *, train: bool = False,
                    work: int = 0) -> str:
    """The backend name that `backend` (possibly "auto") resolves to for an `op` call whose
    input `tensor` holds the op's dim last (q of attention, x of patch_text_logits, v of the
    baseline attentions), needing gradients (`train`) or not, of `work` forward FLOPs."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    dim = tensor.shape[-1]
    head_dim = dim if OPS[op].head_dim else None
    return resolve(op, backend, tensor.dtype, tensor.device, dim=dim, head_dim=head_dim,
                   train=train, bucket=_auto.bucket(work)).name


def auto_choice(op: str, device: str | torch.device, dtype: torch.dtype, dim: int, *,
                train: bool, work: int) -> _auto.Choice:
    """What the auto table says for such a call, and why (before availability is checked)."""
    return _auto.lookup(op, torch.device(device), dtype, dim, train, _auto.bucket(work))


def explain(op, *args, **kwargs) -> Explanation:
    """Which backend a call runs on, and why each other backend does not.

    ``explain(ops.attention, q, k, v, backend="auto")`` (or the op's name) takes the call as
    written at its call site: the arguments are validated and the backend chosen exactly as the
    call would (gradients needed or not, size bucket), but nothing runs. The `Explanation`
    holds the auto table's entry, and per backend its `Candidate` verdict (picked, cannot run,
    not tried, not considered) with the reasons it cannot run this call; ``print`` shows it.
    """
    name = op if isinstance(op, str) else getattr(op, "__name__", None)
    fn = globals().get(name) if name in OPS else None
    if fn is None or not (op is fn or op == name):
        raise ValueError(f"op must be one of the ops {', '.join(OPS)} (a name or the function), "
                         f"got {op!r}")
    with _dispatch.explaining():
        return fn(*args, **kwargs)


def backend_status(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Every backend -> None when usable on `device`, else why not."""
    return status(device)
