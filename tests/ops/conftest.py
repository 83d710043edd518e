"""Fixtures of the op tests."""
from __future__ import annotations

import pytest
import torch

from helpers.internals import library as _library


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Fused outputs start as NaN, so an element a kernel forgets to write fails the comparison
    (use with ``pytestmark = pytest.mark.usefixtures("poisoned_allocations")``)."""
    monkeypatch.setattr(_library, "POISON_ALLOCATIONS", True)


@pytest.fixture
def cuda_backend_on_tf32():
    """Skips unless the cuda backend loads; float32 runs on TF32 for the test (the cuda backend's
    baseline kernels refuse float32 at precision 'highest')."""
    from armfast import ops
    reason = ops.backend_status("cuda")["cuda"]
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(previous)
