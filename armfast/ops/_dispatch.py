"""One dispatch for every op: the call's key, the backend it resolves to, and the path it runs.

`run` reads the call's key off its tensors (`_specs.OpSpec`: the dim and forward FLOPs that
the auto table is keyed by, and for `auto` whether gradients are needed), resolves the backend
(cached per kind of call, `_registry.resolve`) and runs its eager fast path; under
`torch.compile`/`torch.export` it runs the backend's `torch.library` custom ops instead, the
choice made once while tracing and kept as a constant of the graph. Inside `explaining()` it
runs nothing and returns the `_registry.Explanation` of the choice instead.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

from . import _auto, _registry, _validate
from ._specs import OpSpec

_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_resolve, _bucket = _registry.resolve, _auto.bucket  # bound once: run() is on every call's path
_explaining = 0  # threads inside `explaining()`; the fast path reads only this
_local = threading.local()


def run(spec: OpSpec, backend: str, layout, tensors: tuple[Tensor, ...], args: tuple):
    """Runs `spec`'s op on `args` (validated; `tensors` are its tensor inputs, the first giving
    dtype and device) with `backend`; ``layout`` is the op's ``layout=`` (None without one)."""
    heads_last = layout != "bhnd" and _validate.heads_last(layout) if spec.layout else None
    x = tensors[0]
    dim = tensors[spec.dim_of].shape[-1]
    head_dim = dim if spec.head_dim else None
    train = work = None
    if backend == "auto":  # the table's key: gradients needed or not, and the size of the work
        train = _grad_enabled() and _any_requires_grad(tensors)
        work = spec.key(*spec.call_sizes(*tensors))[1]
    if _explaining and getattr(_local, "on", False):
        return _registry.explain(spec.name, backend, x.dtype, x.device, dim=dim,
                                 head_dim=head_dim, train=train, bucket=work and _auto.bucket(work))
    if _is_compiling():
        name = _backend_name(spec.name, backend, x.dtype, x.device, _traced_int(dim),
                             head_dim and _traced_int(head_dim), train, _traced_bucket(work))
        impl = _registry.load(name).ops[spec.name].compiled
    else:
        impl = _resolve(spec.name, backend, x.dtype, x.device, dim, head_dim, train,
                        work and _bucket(work)).ops[spec.name]
    return impl(*args) if heads_last is None else impl(*args, heads_last)


def _any_requires_grad(tensors: tuple[Tensor, ...]) -> bool:
    for t in tensors:  # a loop, not any(generator): this runs on every auto call
        if t.requires_grad:
            return True
    return False


@contextlib.contextmanager
def explaining():
    """Within it, op calls of this thread return their `_registry.Explanation`, running nothing."""
    global _explaining
    _local.on = True
    _explaining += 1
    try:
        yield
    finally:
        _explaining -= 1
        _local.on = False


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
    return _registry.resolve(op, backend, dtype, device, dim=dim, head_dim=head_dim, train=train,
                             bucket=bucket).name
