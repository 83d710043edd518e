"""Shared fixtures and helpers: fresh random inputs, strided views, float64 ground truth."""
from __future__ import annotations

import os

import pytest
import torch

# The Triton tests run in their own process with TRITON_INTERPRET=1 set from the start (the
# interpreter is chosen when the kernels are defined); without a GPU the main run leaves them out.
collect_ignore = []
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore.append("triton")

AWKWARD_N = (1, 7, 197, 785)


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


def make_qkv(B, H, Nq, Nk, d, *, dtype=torch.float32, device="cpu", strided=False,
             requires_grad=False, generator=None):
    """q [B,H,Nq,d], k/v [B,H,Nk,d]; strided=True gives non-contiguous views (as from a
    fused qkv projection: [B, N, H, d] transposed)."""
    def one(n):
        if strided:
            base = torch.randn(B, n, H, 2 * d, dtype=torch.float64, generator=generator)
            t = base.to(device=device, dtype=dtype)[..., ::2].transpose(1, 2)
            assert not t.is_contiguous() and t.stride(-1) == 2
        else:
            t = torch.randn(B, H, n, d, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad) if requires_grad else t
    return one(Nq), one(Nk), one(Nk)


def attention_f64(q, k, v, scale=None):
    """Independent float64 attention with torch autograd, the ground truth of every test."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


def patch_text_logits_f64(x, text, logit_scale):
    x, text = x.double(), text.double()
    scale = logit_scale.double() if isinstance(logit_scale, torch.Tensor) else logit_scale
    xn = x / x.norm(dim=-1, keepdim=True)
    tn = text / text.norm(dim=-1, keepdim=True)
    return scale * xn @ tn.t()


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
