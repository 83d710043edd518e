"""The fused ops of armfast, one entry point each; `backend=` picks the implementation.

- `attention(q, k, v, *, scale=None, backend="auto")`: softmax(q k^T * scale) v.
- `patch_text_logits(x, text, *, logit_scale=1.0, backend="auto")`:
  logit_scale * normalize(x) @ normalize(text)^T.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validate
from ._registry import AUTO_ORDER, BACKENDS, Backend, available_backends, resolve, status

__all__ = ["attention", "patch_text_logits", "available_backends", "backend_status", "BACKENDS",
           "resolve_backend"]


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
              backend: str = "auto") -> Tensor:
    """Multi-head attention ``softmax(q k^T * scale) v``.

    q: ``[B, H, Nq, d]``; k, v: ``[B, H, Nk, d]`` (Nq may differ from Nk); strided views are
    fine. ``scale`` defaults to ``d ** -0.5``. Returns ``[B, H, Nq, d]`` in q's dtype, with
    gradients to q, k and v.
    """
    scale = _validate.attention_args(q, k, v, scale)
    impl = resolve("attention", backend, q.dtype, q.device, head_dim=q.shape[-1])
    return impl.attention(q, k, v, scale)


def patch_text_logits(x: Tensor, text: Tensor, *, logit_scale: float | Tensor = 1.0,
                      backend: str = "auto") -> Tensor:
    """Cosine logits ``logit_scale * normalize(x) @ normalize(text)^T``.

    x: ``[B, N, E]`` patch features; text: ``[C, E]`` class embeddings; logit_scale: a number
    or a one-element tensor (gradients flow to it). Returns ``[B, N, C]`` in x's dtype.
    """
    scale = _validate.patch_text_logits_args(x, text, logit_scale)
    impl = resolve("patch_text_logits", backend, x.dtype, x.device)
    return impl.patch_text_logits(x, text, scale)


def resolve_backend(op: str, backend: str, tensor: Tensor) -> str:
    """The backend name that `backend` (possibly "auto") resolves to for `tensor`."""
    head_dim = tensor.shape[-1] if op == "attention" else None
    return resolve(op, backend, tensor.dtype, tensor.device, head_dim).name


def backend_status(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Every backend -> None when usable on `device`, else why not."""
    return status(device)
