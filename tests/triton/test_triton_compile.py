"""The kernels compile for the GPU (sm_90), even where no GPU exists to run them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    backends = pytest.importorskip("triton.backends")
    if "nvidia" not in getattr(backends, "backends", {}):
        pytest.skip("this Triton has no NVIDIA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--dtype", "float16",
                             "--head-dim", "40"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "ptl_fwd", "ptl_bwd_dtext"):
        assert kernel in result.stdout
