"""torch.library plumbing shared by the backends.

A backend supplies plain functions; `define_attention` and `define_patch_text_logits` turn them
into custom ops (``armfast::attention_<backend>`` and its ``_backward``) with fake kernels and
autograd, so `torch.compile` traces through them and `torch.library.opcheck` can check them.

Contract for the supplied functions (all outputs freshly allocated and contiguous):
  attention forward(q, k, v, scale) -> (out [B,H,Nq,d] in q.dtype,
                                        lse [B,H,Nq] in `lse_dtype(q.dtype)`)
  attention backward(dout, q, k, v, out, lse, scale) -> (dq, dk, dv)
  patch_text_logits forward(x, text, logit_scale) -> out [B,N,C] in x.dtype
  patch_text_logits backward(dout, x, text, logit_scale) -> (dx, dtext, dlogit_scale)
Inputs may be strided views; logit_scale is a 0-d tensor.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

AttentionForward = Callable[[Tensor, Tensor, Tensor, float], "tuple[Tensor, Tensor]"]
AttentionBackward = Callable[..., "tuple[Tensor, Tensor, Tensor]"]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is kept in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Tests set this to fill every buffer the fused backends allocate with NaN, so that an element a
# kernel forgets to write shows up instead of passing as left-over memory.
POISON_ALLOCATIONS = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output/scratch allocation of the fused backends (NaN-filled when POISON_ALLOCATIONS)."""
    if POISON_ALLOCATIONS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _contiguous(*ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.contiguous() for t in ts)


def define_attention(backend: str, forward: AttentionForward, backward: AttentionBackward,
                     device_types: str | tuple[str, ...] | None = None) -> Callable:
    """Registers the attention ops of `backend`; returns `fn(q, k, v, scale) -> out` with autograd."""
    name = f"armfast::attention_{backend}"

    @torch.library.custom_op(name, mutates_args=(), device_types=device_types)
    def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        return _contiguous(*forward(q, k, v, scale))

    @attention_fwd.register_fake
    def _(q, k, v, scale):
        B, H, Nq, _ = q.shape
        return q.new_empty((B, H, Nq, v.shape[-1])), q.new_empty((B, H, Nq), dtype=lse_dtype(q.dtype))

    @torch.library.custom_op(name + "_backward", mutates_args=(), device_types=device_types)
    def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      scale: float) -> tuple[Tensor, Tensor, Tensor]:
        return _contiguous(*backward(dout, q, k, v, out, lse, scale))

    @attention_bwd.register_fake
    def _(dout, q, k, v, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale

    def backward_rule(ctx, dout, dlse):
        # lse is an auxiliary output for the backward pass; gradients do not flow through it.
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    attention_fwd.register_autograd(backward_rule, setup_context=setup_context)

    def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        return attention_fwd(q, k, v, scale)[0]

    attention.forward_op, attention.backward_op = attention_fwd, attention_bwd
    return attention


def define_patch_text_logits(backend: str, forward: Callable, backward: Callable,
                             device_types: str | tuple[str, ...] | None = None) -> Callable:
    """Registers the patch-text-logits ops of `backend`; returns `fn(x, text, logit_scale)`."""
    name = f"armfast::patch_text_logits_{backend}"

    @torch.library.custom_op(name, mutates_args=(), device_types=device_types)
    def logits_fwd(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
        return forward(x, text, logit_scale).contiguous()

    @logits_fwd.register_fake
    def _(x, text, logit_scale):
        return x.new_empty((x.shape[0], x.shape[1], text.shape[0]))

    @torch.library.custom_op(name + "_backward", mutates_args=(), device_types=device_types)
    def logits_bwd(dout: Tensor, x: Tensor, text: Tensor,
                   logit_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _contiguous(*backward(dout, x, text, logit_scale))

    @logits_bwd.register_fake
    def _(dout, x, text, logit_scale):
        return x.new_empty(x.shape), text.new_empty(text.shape), logit_scale.new_empty(logit_scale.shape)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_rule(ctx, dout):
        return logits_bwd(dout, *ctx.saved_tensors)

    logits_fwd.register_autograd(backward_rule, setup_context=setup_context)

    def patch_text_logits(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
        return logits_fwd(x, text, logit_scale)

    patch_text_logits.forward_op, patch_text_logits.backward_op = logits_fwd, logits_bwd
    return patch_text_logits
