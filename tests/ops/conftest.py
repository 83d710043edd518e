"""Fixtures of the op tests."""
from __future__ import annotations

import pytest

from helpers.internals import library as _library


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Fused outputs start as NaN, so an element a kernel forgets to write fails the comparison
    (use with ``pytestmark = pytest.mark.usefixtures("poisoned_allocations")``)."""
    monkeypatch.setattr(_library, "POISON_ALLOCATIONS", True)
