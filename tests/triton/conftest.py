"""Tests of the Triton backend. Without a GPU they run the kernels under the Triton interpreter.

Triton picks compiled or interpreted kernels when `@triton.jit` runs, i.e. when armfast.kernels
is imported (the triton backend does that at the first launch). Pytest loads this conftest
before the test modules of this directory, so setting TRITON_INTERPRET here is early enough
both for `pytest tests/triton` and for a run of the whole suite.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Correctness tests launch each config list's first entry: tuning would compile and time every
# candidate of every (dtype, head dim, bucket) they touch, minutes on a GPU. The tuner has its
# own tests (test_triton_tuning.py, test_triton_compile.py).
os.environ.setdefault("ARMFAST_TRITON_AUTOTUNE", "0")

from armfast.ops import _library  # noqa: E402  (after TRITON_INTERPRET is settled)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_shared_helpers():
    # tests/conftest.py and this file are both top-level modules named "conftest"; pytest keeps
    # only the last one loaded in sys.modules, so the shared helpers are loaded here by path and
    # re-exported (`from conftest import make_qkv` then works in this directory).
    path = Path(__file__).resolve().parent.parent / "conftest.py"
    spec = importlib.util.spec_from_file_location("armfast_tests_shared_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _load_shared_helpers()
AWKWARD_N = _shared.AWKWARD_N
make_qkv = _shared.make_qkv
attention_f64 = _shared.attention_f64
patch_text_logits_f64 = _shared.patch_text_logits_f64


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
    monkeypatch.setattr(_library, "POISON_ALLOCATIONS", True)


@pytest.fixture(autouse=True)
def _gpu_dtype_contract(request):
    """Under the interpreter, the triton backend takes only the dtypes it also takes on a GPU,
    unless the test is marked `interpreter_only`: a test that hands it float64 without saying so
    fails here, on the CPU, instead of on the next GPU (it did, once)."""
    from armfast.ops import _registry
    from armfast.ops._backends import triton as _triton
    dtypes = _triton.BACKEND.limits.dtypes
    if DEVICE.type != "cpu" or "interpreter_only" in request.keywords:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(dtypes, "cpu", tuple(dt for dt in dtypes["cpu"] if dt in dtypes["cuda"]))
        _registry.clear_cache()  # resolved choices are cached per dtype
        yield
    _registry.clear_cache()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close(actual, expected, *, atol, rtol, name):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")
