"""Compile-only checks of SC-CLIP's similarity kernels (csrc/cuda/similarity_attention.cu), no GPU
needed, as tests/ops/test_cuda_baseline_compile.py does for the baseline attentions: nvcc -cubin for
sm_80 and sm_90, no local memory (spills) in any kernel, registers within the launch bounds, and
SASS on tensor cores (HMMA; LDSM for 16-bit types)."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from helpers.nvcc import demangle, disassembler_path, nvcc_cubin

pytestmark = pytest.mark.slow

ARCHS = ("80", "90")
# 3 dtypes x (the aggregation kernel + the dual softmax at 3 head dims)
KERNELS = 12


@pytest.fixture(scope="module", params=ARCHS)
def cubin(request, tmp_path_factory):
    arch = request.param
    out, report = nvcc_cubin("similarity_attention.cu", arch, tmp_path_factory.mktemp("similarity_cubin"))
    return arch, out, report


def test_resources(cubin):
    arch, _, report = cubin
    names = demangle(list(report))
    assert len(report) == KERNELS, sorted(names.values())
    for mangled, info in report.items():
        kernel = names[mangled]
        assert info["registers"] <= 255, f"sm_{arch} {kernel}: {info}"
        assert info["local"] == 0 and info["stack"] == 0, f"sm_{arch} {kernel} spills: {info}"


def test_sass_runs_on_tensor_cores(cubin):
    path = disassembler_path()
    if path is None:
        pytest.skip("cuobjdump/nvdisasm not found")
    arch, out, _ = cubin
    sass = subprocess.run(["cuobjdump", "--dump-sass", str(out)], capture_output=True, text=True, check=True,
                          env={**os.environ, "PATH": path}).stdout
    chunks = re.split(r"\n\s*Function : ", sass)[1:]
    names = demangle([c.split("\n", 1)[0].strip() for c in chunks])
    assert len(chunks) == KERNELS
    for chunk in chunks:
        name, body = chunk.split("\n", 1)
        kernel = names[name.strip()]
        ops = set(re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", body, re.M))
        tf32 = re.search(r"Config<float", kernel)
        hmma = [op for op in ops if op.startswith("HMMA")]
        assert hmma and all(op.startswith("HMMA.1688.F32.TF32" if tf32 else "HMMA.16816.F32") for op in hmma), \
            (kernel, hmma)
        if not tf32:
            assert any(op.startswith("LDSM") for op in ops), f"sm_{arch} {kernel}: no ldmatrix"
