"""Autograd plumbing shared by the backends: one eager fast path and one compilable path per op.

A backend supplies plain functions (no autograd); `define_attention` and
`define_patch_text_logits` turn them into an op implementation with two paths, as
flash-attention does:

- eager (``impl(...)``): a `torch.autograd.Function`, or no autograd at all when no gradient
  is needed. It allocates the output once, launches the kernel and saves only what the backward
  reads (the log-sum-exp is saved, never returned, so autograd makes no gradient for it).
- compiled (``impl.compiled(...)``): custom ops ``armfast::<op>_<backend>`` and their
  ``_backward``, with fake kernels and autograd, which `torch.compile`/`torch.export` trace
  and `torch.library.opcheck` checks. `armfast.ops` takes this path while compiling.

Contract for the supplied functions:
  attention forward(q, k, v, scale, out) -> lse [B,H,Nq] in `lse_dtype(q.dtype)`; writes
      softmax(q k^T scale) v into `out`, a [B,H,Nq,d] view with any strides (it may be a
      transposed view of a [B,Nq,H,d] buffer);
  attention backward(dout, q, k, v, out, lse, scale) -> (dq, dk, dv), fresh tensors;
  patch_text_logits forward(x, text, logit_scale) -> out [B,N,C] in x.dtype, fresh;
  patch_text_logits backward(dout, x, text, logit_scale, text_grad) -> (dx, dtext, dlogit_scale),
      dtext may be None when `text_grad` is False (frozen class embeddings: skip that pass).
Inputs may be strided views (dout too); logit_scale is a 0-d tensor. The op layer has already
validated shapes, dtypes and devices (`armfast.ops._validate`) and the backend's own limits
(`armfast.ops._limits.Limits`: dtypes, head dims) when these functions run; the custom ops
check both in their bodies, for callers that reach them directly.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import _validate
from ._limits import Limits


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is kept in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


NORM_EPS = 1e-12  # as in torch.nn.functional.normalize

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


def needs_grad(*ts: Tensor) -> bool:
    """Whether autograd will want gradients of any of `ts` from this call."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def plain(fn: Callable) -> Callable:
    """An implementation made of torch ops with their own autograd: both paths are `fn`."""
    fn.compiled = fn
    return fn


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def attention_output(q: Tensor, v: Tensor, heads_last: bool) -> tuple[Tensor, Tensor]:
    """(the output tensor, its [B,H,Nq,d] view for the kernel): [B,H,Nq,d], or [B,Nq,H,d]
    with `heads_last` so that merging the heads afterwards is a view."""
    B, H, Nq, _ = q.shape
    d = v.shape[-1]
    if heads_last:
        out = empty((B, Nq, H, d), q.dtype, q.device)
        return out, out.transpose(1, 2)
    out = empty((B, H, Nq, d), q.dtype, q.device)
    return out, out


def _heads_first(t: Tensor, heads_last: bool) -> Tensor:
    return t.transpose(1, 2) if heads_last else t


class AttentionImpl:
    """One backend's attention: ``impl(q, k, v, scale, heads_last)`` in eager mode,
    ``impl.compiled(...)`` under torch.compile; ``forward_op``/``backward_op`` are the custom ops."""

    def __init__(self, backend: str, forward: Callable, backward: Callable, limits: Limits,
                 device_types):
        self.backend, self.forward, self.backward = backend, forward, backward
        self.limits = limits
        self.forward_op, self.backward_op = _attention_ops(self, device_types)

    def check(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> None:
        """The compiled path's checks: the op's arguments, then the backend's limits."""
        _validate.attention_args(q, k, v, scale)
        self.limits.check(self.backend, q.dtype, q.device, q.shape[-1])

    def run_forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
                    heads_last: bool) -> tuple[Tensor, Tensor]:
        out, view = attention_output(q, v, heads_last)
        return out, self.forward(q, k, v, scale, view)

    def run_backward(self, dout, q, k, v, out, lse, scale, heads_last):
        return self.backward(_heads_first(dout, heads_last), q, k, v,
                             _heads_first(out, heads_last), lse, scale)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scale: float, heads_last: bool = False) -> Tensor:
        if needs_grad(q, k, v):
            return _FusedAttention.apply(q, k, v, scale, heads_last, self)
        return self.run_forward(q, k, v, scale, heads_last)[0]

    def compiled(self, q: Tensor, k: Tensor, v: Tensor, scale: float, heads_last: bool = False) -> Tensor:
        return self.forward_op(q, k, v, scale, heads_last)[0]


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, heads_last, impl):
        out, lse = impl.run_forward(q, k, v, scale, heads_last)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.heads_last, ctx.impl = scale, heads_last, impl
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.impl.run_backward(dout, q, k, v, out, lse, ctx.scale, ctx.heads_last)
        return dq, dk, dv, None, None, None


def _attention_ops(impl: AttentionImpl, device_types):
    name = f"armfast::attention_{impl.backend}"

    @torch.library.custom_op(name, mutates_args=(), device_types=device_types)
    def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float,
                      heads_last: bool = False) -> tuple[Tensor, Tensor]:
        impl.check(q, k, v, scale)  # callable directly: check what the kernels read
        return impl.run_forward(q, k, v, scale, heads_last)

    @attention_fwd.register_fake
    def _(q, k, v, scale, heads_last=False):
        B, H, Nq, _ = q.shape
        shape = (B, Nq, H, v.shape[-1]) if heads_last else (B, H, Nq, v.shape[-1])
        return q.new_empty(shape), q.new_empty((B, H, Nq), dtype=lse_dtype(q.dtype))

    @torch.library.custom_op(name + "_backward", mutates_args=(), device_types=device_types)
    def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      scale: float, heads_last: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        impl.check(q, k, v, scale)
        _validate.saved_attention(dout, out, lse, q, v, heads_last)
        return _contiguous(*impl.run_backward(dout, q, k, v, out, lse, scale, heads_last))

    @attention_bwd.register_fake
    def _(dout, q, k, v, out, lse, scale, heads_last=False):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, scale, heads_last = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.heads_last = scale, heads_last

    def backward_rule(ctx, dout, dlse):
        # lse is an auxiliary output for the backward pass; gradients do not flow through it.
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.heads_last)
        return dq, dk, dv, None, None

    attention_fwd.register_autograd(backward_rule, setup_context=setup_context)
    return attention_fwd, attention_bwd


def define_attention(backend: str, forward: Callable, backward: Callable, limits: Limits,
                     device_types: str | tuple[str, ...] | None = None) -> AttentionImpl:
    """The attention of `backend` from its forward and backward functions (module docstring)."""
    return AttentionImpl(backend, forward, backward, limits, device_types)


# ---------------------------------------------------------------------------------------------
# patch_text_logits
# ---------------------------------------------------------------------------------------------

class PatchTextLogitsImpl:
    """One backend's patch_text_logits: ``impl(x, text, logit_scale)`` in eager mode,
    ``impl.compiled(...)`` under torch.compile; ``forward_op``/``backward_op`` are the custom ops."""

    def __init__(self, backend: str, forward: Callable, backward: Callable, limits: Limits,
                 device_types):
        self.backend, self.forward, self.backward = backend, forward, backward
        self.limits = limits
        self.forward_op, self.backward_op = _logits_ops(self, device_types)

    def check(self, x: Tensor, text: Tensor, logit_scale: Tensor) -> None:
        _validate.patch_text_logits_args(x, text, logit_scale)
        self.limits.check(self.backend, x.dtype, x.device, None)

    def __call__(self, x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
        if needs_grad(x, text, logit_scale):
            return _FusedLogits.apply(x, text, logit_scale, self)
        return self.forward(x, text, logit_scale)

    def compiled(self, x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
        return self.forward_op(x, text, logit_scale)


class _FusedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, text, logit_scale, impl):
        ctx.save_for_backward(x, text, logit_scale)
        ctx.impl = impl
        return impl.forward(x, text, logit_scale)

    @staticmethod
    def backward(ctx, dout):
        dx, dtext, dscale = ctx.impl.backward(dout, *ctx.saved_tensors, ctx.needs_input_grad[1])
        return dx, dtext, dscale, None


def _logits_ops(impl: PatchTextLogitsImpl, device_types):
    name = f"armfast::patch_text_logits_{impl.backend}"

    @torch.library.custom_op(name, mutates_args=(), device_types=device_types)
    def logits_fwd(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
        impl.check(x, text, logit_scale)
        return impl.forward(x, text, logit_scale).contiguous()

    @logits_fwd.register_fake
    def _(x, text, logit_scale):
        return x.new_empty((x.shape[0], x.shape[1], text.shape[0]))

    @torch.library.custom_op(name + "_backward", mutates_args=(), device_types=device_types)
    def logits_bwd(dout: Tensor, x: Tensor, text: Tensor,
                   logit_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        impl.check(x, text, logit_scale)
        _validate.saved_logits(dout, x, text)
        return _contiguous(*impl.backward(dout, x, text, logit_scale, True))

    @logits_bwd.register_fake
    def _(dout, x, text, logit_scale):
        return x.new_empty(x.shape), text.new_empty(text.shape), logit_scale.new_empty(logit_scale.shape)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_rule(ctx, dout):
        return logits_bwd(dout, *ctx.saved_tensors)

    logits_fwd.register_autograd(backward_rule, setup_context=setup_context)
    return logits_fwd, logits_bwd


def define_patch_text_logits(backend: str, forward: Callable, backward: Callable, limits: Limits,
                             device_types: str | tuple[str, ...] | None = None) -> PatchTextLogitsImpl:
    """The patch_text_logits of `backend` from its forward and backward functions."""
    return PatchTextLogitsImpl(backend, forward, backward, limits, device_types)


# ---------------------------------------------------------------------------------------------
# forward-only fused ops (the baseline attentions)
# ---------------------------------------------------------------------------------------------

class ForwardOnlyOp:
    """An op whose fused backends implement the forward only: the baselines run frozen, so their
    gradients (rarely wanted) recompute the reference math with torch autograd instead.

    ``arguments`` spells the inputs for torch.library ("Tensor x, Tensor v, float scale"): tensors
    first, the last of them the values v ``[B,H,N,d]``, then plain parameters; every op also takes
    a last ``bool heads_last``. The output has v's shape, dtype and device: ``[B,H,N,d]``, or
    ``[B,N,H,d]`` with heads_last. ``math(*tensors, *params)`` is the differentiable reference,
    ``[B,H,N,d]``. With ``heads=False`` the values are ``[B,N,D]`` (no heads: D is no head dim and
    heads_last is always False) and so is the output.

    Contract for a backend's forward: ``forward(*tensors, *params, out)`` writes the result into
    `out`, a view of v's shape with any strides (as for attention), and returns nothing.
    """

    def __init__(self, name: str, arguments: str, math: Callable, heads: bool = True):
        self.name, self.arguments, self.math, self.heads = name, arguments, math, heads
        self.tensors = sum(a.split()[0] == "Tensor" for a in arguments.split(","))
        self.schema = f"({arguments}, bool heads_last) -> Tensor"
        self._backward_op = None

    def gradients(self, dout: Tensor, *args) -> list[Tensor]:
        """Gradients of every tensor input: the vjp of the reference math at the inputs."""
        n = self.tensors
        tensors, params, heads_last = args[:n], args[n:-1], args[-1]
        _, vjp = torch.func.vjp(lambda *ts: self.math(*ts, *params), *tensors)
        return list(vjp(_heads_first(dout, heads_last)))

    @property
    def backward_op(self):
        """``armfast::<op>_backward``: `gradients` as a custom op, one for every backend (the
        recomputation is the same whichever backend ran the forward)."""
        if self._backward_op is None:
            self._backward_op = torch.library.custom_op(
                f"armfast::{self.name}_backward", self.gradients, mutates_args=(),
                schema=f"(Tensor dout, {self.arguments}, bool heads_last) -> Tensor[]")
            n = self.tensors
            self._backward_op.register_fake(
                lambda dout, *args: [t.new_empty(t.shape) for t in args[:n]])
        return self._backward_op


class ForwardOnlyImpl:
    """One backend's forward-only op: ``impl(*args)`` in eager mode, ``impl.compiled(*args)`` under
    torch.compile (custom op ``armfast::<op>_<backend>``, its backward `ForwardOnlyOp.backward_op`)."""

    def __init__(self, op: ForwardOnlyOp, backend: str, forward: Callable, limits: Limits,
                 device_types):
        self.op, self.backend, self.forward, self.limits = op, backend, forward, limits
        self.forward_op = _forward_only_op(self, device_types)

    def checked_forward(self, *args) -> Tensor:
        """The custom op's body: the backend's limits (the dtype, and the head dim of v), then
        the forward."""
        v = args[self.op.tensors - 1]
        self.limits.check(self.backend, v.dtype, v.device, v.shape[-1] if self.op.heads else None)
        return self.run_forward(*args)

    def run_forward(self, *args) -> Tensor:
        v = args[self.op.tensors - 1]
        if self.op.heads:
            out, view = attention_output(v, v, args[-1])
        else:
            out = view = empty(v.shape, v.dtype, v.device)
        self.forward(*args[:-1], view)
        return out

    def __call__(self, *args) -> Tensor:
        if needs_grad(*args[:self.op.tensors]):
            return _ForwardOnly.apply(self, *args)
        return self.run_forward(*args)

    def compiled(self, *args) -> Tensor:
        return self.forward_op(*args)


class _ForwardOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, *args):
        n = impl.op.tensors
        ctx.save_for_backward(*args[:n])
        ctx.rest, ctx.op = args[n:], impl.op
        return impl.run_forward(*args)

    @staticmethod
    def backward(ctx, dout):
        grads = ctx.op.gradients(dout, *ctx.saved_tensors, *ctx.rest)
        return (None, *grads, *(None for _ in ctx.rest))


def _forward_only_op(impl: ForwardOnlyImpl, device_types):
    op, n = impl.op, impl.op.tensors
    forward_op = torch.library.custom_op(
        f"armfast::{op.name}_{impl.backend}", impl.checked_forward,
        mutates_args=(), device_types=device_types, schema=op.schema)

    @forward_op.register_fake
    def _(*args):
        v, heads_last = args[n - 1], args[-1]
        if not op.heads:
            return v.new_empty(v.shape)
        B, H, N, d = v.shape
        return v.new_empty((B, N, H, d) if heads_last else (B, H, N, d))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n])
        ctx.rest = inputs[n:]

    def backward_rule(ctx, dout):
        grads = op.backward_op(dout, *ctx.saved_tensors, *ctx.rest)
        return (*grads, *(None for _ in ctx.rest))

    forward_op.register_autograd(backward_rule, setup_context=setup_context)
    return forward_op


def baseline_ops(backend: str, forwards: dict[ForwardOnlyOp, Callable], limits: Limits,
                 device_types: str | tuple[str, ...] | None = None) -> dict[str, ForwardOnlyImpl]:
    """``Backend.ops`` entries of `backend`'s fused baseline attentions, from their forwards
    (see `ForwardOnlyOp` for the contract)."""
    return {op.name: ForwardOnlyImpl(op, backend, forward, limits, device_types)
            for op, forward in forwards.items()}

