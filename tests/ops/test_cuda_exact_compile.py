"""Compile-only check of the exact float32 CUDA kernels (csrc/cuda/attention_exact.cu, the path
when torch forbids TF32 or the TF32 kernels do not fit), no GPU needed, as
tests/ops/test_cuda_compile.py does for the tensor-core kernels: nvcc -cubin for sm_80 and sm_90,
every kernel within the registers its 128 threads allow, and no local memory. One exception,
stated: on sm_90 ptxas spills a few bytes in the small-tile dK/dV kernel at d = 64, which only
GPUs with 99 KiB of shared memory per block run (they get the sm_80 code, which does not spill)."""
from __future__ import annotations

import re

import pytest

from helpers.nvcc import demangle, nvcc_cubin

pytestmark = pytest.mark.slow

SPILL_ALLOWED = {("90", "attention_bwd_dkdv_kernel<float, 64, true>")}


@pytest.fixture(scope="module", params=("80", "90"))
def report(request, tmp_path_factory):
    arch = request.param
    _, kernels = nvcc_cubin("attention_exact.cu", arch, tmp_path_factory.mktemp("exact_cubin"))
    return arch, kernels


def test_registers_and_local_memory(report):
    arch, kernels = report
    names = demangle(list(kernels))
    # forward, dK/dV and dQ at 3 head dims, small tiles where the large ones exceed 99 KiB, delta
    assert len(kernels) == 15, sorted(names.values())
    for mangled, info in kernels.items():
        kernel = re.sub(r"^void |\(anonymous namespace\)::|armfast::cuda::|\(.*\)$", "", names[mangled])
        assert info["registers"] <= 255, f"sm_{arch} {kernel}: {info}"  # 128 threads per block
        if (arch, kernel) in SPILL_ALLOWED:
            assert info["local"] <= 32 and info["stack"] <= 16, f"sm_{arch} {kernel} spills more: {info}"
        else:
            assert info["local"] == 0 and info["stack"] == 0, f"sm_{arch} {kernel} spills: {info}"
