"""Tests of the Triton backend. Without a GPU they run the kernels under the Triton interpreter.

Triton picks compiled or interpreted kernels when `@triton.jit` runs, i.e. when armfast.kernels
is imported (the triton backend does that at the first launch). Pytest loads this conftest
before the test modules of this directory, so setting TRITON_INTERPRET here is early enough
both for `pytest tests/triton` and for a run of the whole suite.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Correctness tests launch each config list's first entry: tuning would compile and time every
# candidate of every (dtype, head dim, bucket) they touch, minutes on a GPU. The tuner has its
# own tests (test_triton_tuning.py, test_triton_compile.py).
os.environ.setdefault("ARMFAST_TRITON_AUTOTUNE", "0")

from helpers.internals import library, registry, triton_backend  # noqa: E402  (after the above)
from helpers.tensors import DEVICE  # noqa: E402


def triton_unavailable_reason() -> str | None:
    from armfast.ops import backend_status
    return backend_status(DEVICE)["triton"]


def pytest_collection_modifyitems(config, items):
    """Tests marked `interpreter_only` use what only the interpreter has (float64): skipped on a
    GPU."""
    if DEVICE.type == "cpu":
        return
    skip = pytest.mark.skip(reason="interpreter only (float64 has no Triton GPU path)")
    for item in items:
        if "interpreter_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _triton_ready(monkeypatch):
    """Skips when the backend cannot run here; poisons every buffer the wrappers allocate with NaN
    so that an element a kernel does not write fails the comparison."""
    reason = triton_unavailable_reason()
    if reason is not None:
        pytest.skip(f"triton backend unavailable on {DEVICE}: {reason}")
    monkeypatch.setattr(library, "POISON_ALLOCATIONS", True)


@pytest.fixture(autouse=True)
def _gpu_dtype_contract(request):
    """Under the interpreter, the triton backend takes only the dtypes it also takes on a GPU,
    unless the test is marked `interpreter_only`: a test that hands it float64 without saying so
    fails here, on the CPU, instead of on the next GPU (it did, once)."""
    if triton_backend is None or DEVICE.type != "cpu" or "interpreter_only" in request.keywords:
        yield
        return
    dtypes = triton_backend.BACKEND.limits.dtypes
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(dtypes, "cpu", tuple(dt for dt in dtypes["cpu"] if dt in dtypes["cuda"]))
        registry.clear_cache()  # resolved choices are cached per dtype
        yield
    registry.clear_cache()
