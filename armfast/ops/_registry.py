"""Backend registry: which implementations exist, which can run on a device, which `auto` picks.

Backends live in their own modules and are imported lazily, so a missing Triton or a broken CUDA
build only removes that backend (with its reason) and never breaks `import armfast`.

`resolve` runs on every op call, so what it decides is cached per (op, backend, dtype, device,
dim, mode, size bucket); only the first call of a kind pays for the checks and the table lookup.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from . import _auto

BACKENDS = ("reference", "sdpa", "triton", "cuda", "cpu")

# name -> "module:attribute" holding a `Backend`
_LOCATIONS = {
    "reference": "armfast.ops._reference:BACKEND",
    "sdpa": "armfast.ops._sdpa:BACKEND",
    "triton": "armfast.ops._triton:BACKEND",
    "cuda": "armfast.ops._extension:CUDA_BACKEND",
    "cpu": "armfast.ops._extension:CPU_BACKEND",
}

ANY_DTYPE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops. ``ops`` maps an op name to its implementation: a callable
    for eager mode (the fast path) with a ``compiled`` attribute, the path taken under
    `torch.compile`/`torch.export` (see `armfast.ops._library`). ``backend.attention`` is
    ``backend.ops["attention"]``."""

    name: str
    ops: Mapping[str, Callable]
    dtypes: Mapping[str, tuple[torch.dtype, ...]]  # device type -> supported dtypes
    head_dims: Optional[tuple[int, ...] | range] = None  # attention head dims; None = any
    # device -> None when the backend can run there now, else the reason it cannot
    runtime_check: Callable[[torch.device], Optional[str]] = field(default=lambda device: None)

    def __getattr__(self, name: str):
        ops = self.__dict__.get("ops", {})
        if name in ops:
            return ops[name]
        raise AttributeError(f"backend {self.__dict__.get('name')!r} has no op {name!r}")

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type not in self.dtypes:
            return f"runs on {'/'.join(self.dtypes)} tensors, not {device.type}"
        return self.runtime_check(device)


_loaded: dict[str, Backend | str] = {}


def load(name: str) -> Backend | str:
    """Returns the `Backend`, or a string saying why it could not be loaded."""
    if name not in _loaded:
        module, attr = _LOCATIONS[name].split(":")
        try:
            _loaded[name] = getattr(importlib.import_module(module), attr)
        except Exception as exc:  # any import problem only disables this backend
            _loaded[name] = f"failed to load ({type(exc).__name__}: {exc})"
    return _loaded[name]


def status(device: str | torch.device = "cpu") -> dict[str, Optional[str]]:
    """Every backend name -> None when usable on `device`, else the reason it is not."""
    device = torch.device(device)
    result = {}
    for name in BACKENDS:
        b = load(name)
        result[name] = b if isinstance(b, str) else b.unavailable_reason(device)
    return result


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run on `device` (a device or its type)."""
    return [name for name, reason in status(device).items() if reason is None]


def _unsupported(b: Backend, op: str, dtype: torch.dtype, device: torch.device,
                 head_dim: Optional[int]) -> Optional[tuple[type, str]]:
    """(error type, message) when `b` cannot run `op` on these inputs, else None."""
    reason = b.unavailable_reason(device)
    if reason is not None:
        return RuntimeError, f"backend '{b.name}' is not available on {device}: {reason}"
    if op not in b.ops:
        return ValueError, f"backend '{b.name}' has no {op} op"
    if dtype not in b.dtypes[device.type]:
        names = ", ".join(_auto.dtype_name(d) for d in b.dtypes[device.type])
        return TypeError, (f"backend '{b.name}' supports dtypes {names} on {device.type}, "
                           f"got {_auto.dtype_name(dtype)}")
    if head_dim is not None and b.head_dims is not None and head_dim not in b.head_dims:
        dims = b.head_dims
        dims = f"{dims.start}..{dims.stop - 1}" if isinstance(dims, range) else tuple(dims)
        return ValueError, f"backend '{b.name}' supports head dims {dims}, got d={head_dim}"
    return None


def _explicit(op: str, backend, dtype: torch.dtype, device: torch.device,
              head_dim: Optional[int]) -> Backend:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend not in _LOCATIONS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    b = load(backend)
    if isinstance(b, str):
        raise RuntimeError(f"backend '{backend}' is not available: {b}")
    problem = _unsupported(b, op, dtype, device, head_dim)
    if problem is not None:
        error, message = problem
        raise error(message)
    return b


def _pick_auto(op: str, dtype: torch.dtype, device: torch.device, dim: Optional[int],
          head_dim: Optional[int], train: bool, bucket: int) -> Backend:
    """The measured choice of the table, when it can run; else sdpa; else reference."""
    choice = _auto.lookup(op, device, dtype, dim, train, bucket)
    for name in (choice.backend, _auto.FALLBACK, "reference"):
        b = load(name) if name in _LOCATIONS else None
        if isinstance(b, Backend) and _unsupported(b, op, dtype, device, head_dim) is None:
            return b
    raise TypeError(f"no backend can run {op} on {device} with dtype {_auto.dtype_name(dtype)}")


_resolved: dict[tuple, Backend] = {}


def resolve(op: str, backend, dtype: torch.dtype, device: torch.device, *,
            dim: Optional[int] = None, head_dim: Optional[int] = None,
            train: Optional[bool] = False, bucket: Optional[int] = None) -> Backend:
    """Picks the backend for one call, or raises an error that says why it cannot run.

    dim: the op's size key in the auto table (the head dim of attention, E of the logits);
    head_dim: checked against the backends' supported head dims; train: gradients will be
    needed; bucket: the size bucket of the call's forward FLOPs (`_auto.bucket`). Only `auto`
    reads `train` and `bucket`."""
    auto = backend == "auto"
    key = (op, backend, dtype, device, dim, head_dim, bool(train) if auto else None,
           bucket if auto else None)
    b = _resolved.get(key)
    if b is None:
        if auto:
            b = _pick_auto(op, dtype, device, dim, head_dim, train, key[-1])
        else:
            b = _explicit(op, backend, dtype, device, head_dim)
        _resolved[key] = b
    return b


def clear_cache() -> None:
    """Forgets every cached choice (after the auto table or the environment changed)."""
    _resolved.clear()
    _auto.clear_cache()
