"""The `triton` backend in the registry: availability reasons, dtypes, head dims, auto routing."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from armfast.ops._backends import triton as _triton
from armfast.ops import attention, backend_status, resolve_backend
from helpers.tensors import DEVICE, make_qkv


def test_available_here():
    assert backend_status(DEVICE)["triton"] is None
    q, _, _ = make_qkv(1, 1, 3, 3, 32, device=DEVICE)
    assert resolve_backend("attention", "triton", q) == "triton"


def test_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setattr(_triton, "interpret_mode", lambda: False)
    reason = _triton.runtime_check(torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in reason


def test_cuda_without_torch_cuda_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch.cuda is not available" in _triton.runtime_check(torch.device("cuda"))


def test_head_dim_limit():
    q, k, v = make_qkv(1, 1, 2, 2, 136, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        attention(q, k, v, backend="triton")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="float16 is rejected on CPU only")
def test_half_rejected_on_cpu():
    q, k, v = make_qkv(1, 1, 2, 2, 32, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtypes"):
        attention(q, k, v, backend="triton")


def test_import_without_triton():
    """A missing Triton only removes this backend; `import armfast` and the others still work."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import armfast, torch\n"
            "reason = armfast.backend_status('cpu')['triton']\n"
            "assert reason.startswith('failed to load'), reason\n"
            "q = torch.randn(1, 1, 3, 8)\n"
            "armfast.ops.attention(q, q, q, backend='reference')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
