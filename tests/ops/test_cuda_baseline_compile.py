"""Compile-only checks of the baseline attention kernels (csrc/cuda/baseline_attention.cu), no GPU
needed, as tests/ops/test_cuda_compile.py does for the attention: nvcc -cubin for sm_80 and sm_90,
no local memory (spills), registers within the launch bounds, and SASS on tensor cores (HMMA;
LDSM for 16-bit types; the element-wise combination of ProxyCLIP's key ranges aside). One
exception, stated: SCLIP's two-operand kernel at head dim 128 holds
two 16 x 128 fp32 accumulators per warp row block and spills a little (CLIP models use d = 64)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers.nvcc import demangle, disassembler_path, nvcc_cubin

pytestmark = pytest.mark.slow

ARCHS = ("80", "90")
SPILL_ALLOWED = re.compile(r"SelfCorrConfig<[^,]+, 128, true")


@pytest.fixture(scope="module", params=ARCHS)
def cubin(request, tmp_path_factory):
    arch = request.param
    out, report = nvcc_cubin("baseline_attention.cu", arch, tmp_path_factory.mktemp("baseline_cubin"))
    return arch, out, report


def test_resources(cubin):
    arch, _, report = cubin
    names = demangle(list(report))
    kernels = sorted(names[k] for k in report)
    # 3 dtypes x (3 head dims x 3 variants + the masked affinity kernel, large and small tiles,
    # and the combination of its key ranges)
    assert len(kernels) == 36, kernels
    for mangled, info in report.items():
        kernel = names[mangled]
        assert info["registers"] <= 255, f"sm_{arch} {kernel}: {info}"  # 128 threads per block
        if not SPILL_ALLOWED.search(kernel):
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
    assert len(chunks) == 36
    for chunk in chunks:
        name, body = chunk.split("\n", 1)
        kernel = names[name.strip()]
        if "combine_kernel" in kernel:  # element-wise: a weighted sum of the key ranges' rows
            continue
        ops = set(re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", body, re.M))
        tf32 = re.search(r"Config<float", kernel)
        hmma = [op for op in ops if op.startswith("HMMA")]
        assert hmma and all(op.startswith("HMMA.1688.F32.TF32" if tf32 else "HMMA.16816.F32") for op in hmma), \
            (kernel, hmma)
        if not tf32:
            assert any(op.startswith("LDSM") for op in ops), f"sm_{arch} {kernel}: no ldmatrix"
