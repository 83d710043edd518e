"""Tests of the Triton backend. Without a GPU they run the kernels under the Triton interpreter.

Triton picks compiled or interpreted kernels when `@triton.jit` runs, i.e. when armfast.kernels
is imported (armfast.ops._triton does that at the first launch). Pytest loads this conftest
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


@pytest.fixture(autouse=True)
def _triton_ready(monkeypatch):
    """Skips when the backend cannot run here; poisons every buffer the wrappers allocate with NaN
    so that an element a kernel does not write fails the comparison."""
    reason = triton_unavailable_reason()
    if reason is not None:
        pytest.skip(f"triton backend unavailable on {DEVICE}: {reason}")
    from armfast.ops import _triton
    monkeypatch.setattr(_library, "POISON_ALLOCATIONS", True)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close(actual, expected, *, atol, rtol, name):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")
