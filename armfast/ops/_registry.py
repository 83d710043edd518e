"""Backend registry: which implementations exist, which can run a call, which `auto` picks and why.

Backends live in their own modules (`armfast.ops._backends`) and are imported lazily, so a
missing Triton or a broken CUDA build only removes that backend (with its reason) and never
breaks `import armfast`.

Each backend states why it cannot run a call (`reasons`, as xformers' attention dispatch does):
not loadable, not available on the device, or outside its `Limits`. An explicit backend raises
the first reason; `auto` tries the auto table's measured choice, then sdpa, then reference, and
takes the first without one; `explain` reports every backend's reasons and which one won.
`resolve` runs on every op call, so what it decides is cached per (op, backend, dtype, device,
dim, mode, size bucket); only the first call of a kind pays for the checks and the table lookup.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from . import _auto
from ._library import baseline_ops, define_attention, define_patch_text_logits
from ._limits import Limits, dtype_name

BACKENDS = ("reference", "sdpa", "triton", "cuda", "cpu")

# name -> "module:attribute" holding a `Backend`
_LOCATIONS = {name: f"armfast.ops._backends.{name}:BACKEND" for name in BACKENDS}


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops. ``ops`` maps an op name to its implementation: a callable
    for eager mode (the fast path) with a ``compiled`` attribute, the path taken under
    `torch.compile`/`torch.export` (see `armfast.ops._library`). ``backend.attention`` is
    ``backend.ops["attention"]``. ``limits`` is what its kernels take (both paths check it)."""

    name: str
    ops: Mapping[str, Callable]
    limits: Limits
    # device -> None when the backend can run there now, else the reason it cannot
    runtime_check: Callable[[torch.device], Optional[str]] = field(default=lambda device: None)

    def __getattr__(self, name: str):
        ops = self.__dict__.get("ops", {})
        if name in ops:
            return ops[name]
        raise AttributeError(f"backend {self.__dict__.get('name')!r} has no op {name!r}")

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return self.limits.device_problem(device.type) or self.runtime_check(device)


def fused_backend(name: str, limits: Limits, *, attention: tuple[Callable, Callable],
                  patch_text_logits: tuple[Callable, Callable], baselines: dict,
                  runtime_check: Callable[[torch.device], Optional[str]],
                  device_types: str | tuple[str, ...] | None = None) -> Backend:
    """A backend of fused kernels: attention and patch_text_logits from their (forward,
    backward) functions, the baseline attentions from their forwards (`ForwardOnlyOp` ->
    forward), with the contracts of `armfast.ops._library`; every op checks `limits`."""
    return Backend(name, {
        "attention": define_attention(name, *attention, limits, device_types),
        "patch_text_logits": define_patch_text_logits(name, *patch_text_logits, limits, device_types),
        **baseline_ops(name, baselines, limits, device_types)}, limits, runtime_check)


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


def reasons(name: str, op: str, dtype: torch.dtype, device: torch.device,
            head_dim: Optional[int]) -> list[tuple[type, str]]:
    """(error type, message) for every reason backend `name` cannot run this call; empty when
    it can."""
    b = load(name)
    if isinstance(b, str):
        return [(RuntimeError, f"backend '{name}' is not available: {b}")]
    reason = b.unavailable_reason(device)
    if reason is not None:
        return [(RuntimeError, f"backend '{name}' is not available on {device}: {reason}")]
    found = [] if op in b.ops else [(ValueError, f"backend '{name}' has no {op} op")]
    return found + b.limits.problems(name, dtype, device.type, head_dim)


def _check_name(backend) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend not in _LOCATIONS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")


def _explicit(op: str, backend, dtype: torch.dtype, device: torch.device,
              head_dim: Optional[int]) -> Backend:
    _check_name(backend)
    for error, message in reasons(backend, op, dtype, device, head_dim):
        raise error(message)
    return load(backend)


def auto_order(choice: _auto.Choice) -> tuple[str, ...]:
    """The backends `auto` tries, in order: the table's measured choice, sdpa, reference."""
    return tuple(dict.fromkeys((choice.backend, _auto.FALLBACK, "reference")))


def _pick_auto(op: str, dtype: torch.dtype, device: torch.device, dim: Optional[int],
               head_dim: Optional[int], train: bool, bucket: int) -> Backend:
    """The measured choice of the table, when it can run; else sdpa; else reference."""
    for name in auto_order(_auto.lookup(op, device, dtype, dim, train, bucket)):
        if name in _LOCATIONS and not reasons(name, op, dtype, device, head_dim):
            return load(name)
    raise TypeError(f"no backend can run {op} on {device} with dtype {dtype_name(dtype)}")


_resolved: dict[tuple, Backend] = {}


def resolve(op: str, backend, dtype: torch.dtype, device: torch.device,
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


@dataclass(frozen=True)
class Candidate:
    """One backend's part in a call's choice: ``verdict`` is ``"picked"``, ``"cannot run"``,
    ``"not tried"`` (auto took an earlier one) or ``"not considered"`` (auto tries only the
    table's choice, sdpa and reference); ``reasons`` says why it cannot run this call."""

    backend: str
    verdict: str
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Explanation:
    """Why a call runs on `backend` (None: no backend can run it): the key of the call, the
    auto table's answer (auto only) and every backend's `Candidate`, in the order tried."""

    op: str
    requested: str
    backend: Optional[str]
    device: str
    dtype: str
    dim: Optional[int]
    train: Optional[bool]
    bucket: Optional[int]
    table: Optional[_auto.Choice]
    candidates: tuple[Candidate, ...]

    def lines(self) -> list[str]:
        size = "" if self.bucket is None else f", {_auto.bucket_range(self.bucket)}"
        mode = "" if self.train is None else (", training" if self.train else ", forward")
        dim = "" if self.dim is None else f", dim {self.dim}"
        out = [f"{self.op} on {self.device}, {self.dtype}{dim}{mode}{size}: {self.requested} -> "
               f"{self.backend or 'no backend can run it'}"]
        if self.table is not None:
            out.append(f"  auto table: {self.table.backend} ({self.table.source})")
        notes = {"not tried": f" ({self.backend} comes first)",
                 "not considered": " (auto tries the table's choice, then sdpa, then reference)"}
        for c in self.candidates:
            why = f": {'; '.join(c.reasons)}" if c.reasons else ""
            out.append(f"  {c.backend:<10} {c.verdict}{notes.get(c.verdict, '')}{why}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def explain(op: str, backend, dtype: torch.dtype, device: torch.device, *,
            dim: Optional[int] = None, head_dim: Optional[int] = None,
            train: Optional[bool] = None, bucket: Optional[int] = None) -> Explanation:
    """`resolve`'s choice for this call, with every backend's reasons (see `Explanation`)."""
    device = torch.device(device)

    def why(name: str) -> tuple[str, ...]:
        return tuple(message for _, message in reasons(name, op, dtype, device, head_dim))

    table, picked, candidates = None, None, []
    if backend == "auto":
        table = _auto.lookup(op, device, dtype, dim, bool(train), bucket)
        order = [n for n in auto_order(table) if n in _LOCATIONS]
        for name in order:
            found = why(name)
            verdict = "cannot run" if found else ("not tried" if picked else "picked")
            picked = picked or (None if found else name)
            candidates.append(Candidate(name, verdict, found))
        candidates += [Candidate(n, "not considered", why(n)) for n in BACKENDS if n not in order]
    else:
        _check_name(backend)
        found = why(backend)
        picked = None if found else backend
        candidates.append(Candidate(backend, "cannot run" if found else "picked", found))
    return Explanation(op, backend, picked, str(device), dtype_name(dtype), dim,
                       bool(train) if backend == "auto" else None,
                       bucket if backend == "auto" else None, table, tuple(candidates))


def clear_cache() -> None:
    """Forgets every cached choice (after the auto table or the environment changed)."""
    _resolved.clear()
    _auto.clear_cache()
