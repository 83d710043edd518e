"""Pytest hooks and fixtures of the whole suite; the helpers tests import live in `helpers/`
(importable as `helpers.*`: pyproject.toml puts tests/ on the path)."""
from __future__ import annotations

import os

import pytest
import torch

# The Triton tests run in their own process with TRITON_INTERPRET=1 set from the start (the
# interpreter is chosen when the kernels are defined); without a GPU the main run leaves them out.
collect_ignore = []
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore.append("triton")

def _blas_core() -> str:
    """The OpenBLAS kernel numpy runs (the Triton interpreter's tl.dot is numpy's matmul, so its
    rounding follows this), or why it is unknown."""
    try:
        import ctypes
        import glob

        import numpy
        libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__) + ".libs", "*openblas*"))
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                     "openblas_get_corename64_", "openblas_get_corename"):
            for lib in libs:
                fn = getattr(ctypes.CDLL(lib), name, None)
                if fn is not None:
                    fn.restype = ctypes.c_char_p
                    return f"OpenBLAS {fn().decode()}"
    except (ImportError, OSError) as exc:
        return f"unknown ({exc})"
    return "unknown (no OpenBLAS in numpy)"


def pytest_report_header(config):
    """Versions that change numerics, so that a red run tells a version change from a bug."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    import numpy
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"armfast numerics: torch {torch.__version__}, triton {triton_version}, numpy "
            f"{numpy.__version__} (BLAS: {_blas_core()}), GPU: {gpu}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(autouse=True)
def _text_cache_env(monkeypatch):
    """An in-process `--text-cache` run points ARMFAST_TEXT_CACHE at its folder for the rest of
    the process (as a command does); each test starts and ends with the variable as it was, so
    that no later test reads embeddings a test before it cached (and skips its progress bar)."""
    from armfast.clip.text import TEXT_CACHE_ENV

    original = os.environ.get(TEXT_CACHE_ENV)
    # setenv records the variable's state, so that teardown puts it back whatever the test did
    # (a delenv of an absent variable records nothing)
    monkeypatch.setenv(TEXT_CACHE_ENV, original or "")
    if original is None:
        monkeypatch.delenv(TEXT_CACHE_ENV)
