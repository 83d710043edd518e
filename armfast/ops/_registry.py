"""Backend registry: which implementations exist, which can run on a device, which `auto` picks.

Backends live in their own modules and are imported lazily, so a missing Triton or a broken CUDA
build only removes that backend (with its reason) and never breaks `import armfast`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

BACKENDS = ("reference", "sdpa", "triton", "cuda", "cpu")

# name -> "module:attribute" holding a `Backend`
_LOCATIONS = {
    "reference": "armfast.ops._reference:BACKEND",
    "sdpa": "armfast.ops._sdpa:BACKEND",
    "triton": "armfast.ops._triton:BACKEND",
    "cuda": "armfast.ops._extension:CUDA_BACKEND",
    "cpu": "armfast.ops._extension:CPU_BACKEND",
}

# What `backend="auto"` tries, per op and device type, fastest first (see benchmarks/RESULTS.md).
# The first backend that can take the inputs wins.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {"cuda": ("triton", "cuda", "sdpa", "reference"), "cpu": ("sdpa", "cpu", "reference")},
    "patch_text_logits": {"cuda": ("triton", "cuda", "sdpa", "reference"),
                          "cpu": ("cpu", "sdpa", "reference")},
}
_FALLBACK_ORDER = ("sdpa", "reference")

ANY_DTYPE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    name: str
    attention: Callable  # (q, k, v, scale: float) -> out, differentiable
    patch_text_logits: Callable  # (x, text, logit_scale: 0-d tensor) -> logits, differentiable
    dtypes: Mapping[str, tuple[torch.dtype, ...]]  # device type -> supported dtypes
    head_dims: Optional[tuple[int, ...]] = None  # attention head dims; None = any
    # device -> None when the backend can run there now, else the reason it cannot
    runtime_check: Callable[[torch.device], Optional[str]] = field(default=lambda device: None)

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


def _unsupported(b: Backend, dtype: torch.dtype, device: torch.device,
                 head_dim: Optional[int]) -> Optional[tuple[type, str]]:
    reason = b.unavailable_reason(device)
    if reason is not None:
        return RuntimeError, f"backend '{b.name}' is not available on {device}: {reason}"
    if dtype not in b.dtypes[device.type]:
        names = ", ".join(str(d).replace("torch.", "") for d in b.dtypes[device.type])
        return TypeError, (f"backend '{b.name}' supports dtypes {names} on {device.type}, "
                           f"got {str(dtype).replace('torch.', '')}")
    if head_dim is not None and b.head_dims is not None and head_dim not in b.head_dims:
        return ValueError, f"backend '{b.name}' supports head dims {b.head_dims}, got d={head_dim}"
    return None


def resolve(op: str, backend, dtype: torch.dtype, device: torch.device,
            head_dim: Optional[int] = None) -> Backend:
    """Picks the backend for one call, or raises an error that says why it cannot run."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        order = AUTO_ORDER[op].get(device.type, _FALLBACK_ORDER)
        errors = []
        for name in order:
            b = load(name)
            problem = (RuntimeError, b) if isinstance(b, str) else _unsupported(b, dtype, device, head_dim)
            if problem is None:
                return b
            errors.append(problem[0])
        # the last candidate is the most permissive (reference): its error type says why
        error = errors[-1] if errors else RuntimeError
        raise error(f"no backend can run {op} on {device} with dtype {str(dtype).replace('torch.', '')}")
    if backend not in _LOCATIONS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    b = load(backend)
    if isinstance(b, str):
        raise RuntimeError(f"backend '{backend}' is not available: {b}")
    problem = _unsupported(b, dtype, device, head_dim)
    if problem is not None:
        error, message = problem
        raise error(message)
    return b
