"""Compile-only checks of the tensor-core CUDA kernels, no GPU needed: every kernel compiles for
sm_80 and sm_90 without local memory (no spills, no stack), within the registers its launch
bounds allow, and its SASS has the instructions the design rests on: HMMA (mma.sync), LDSM
(ldmatrix), LDGSTS (cp.async, in the attention kernels), and no LDL/STL.

The cubins come from the built armfast._C_cuda when it holds them (the default arch list
"8.0;9.0+PTX" does), read with cuobjdump; otherwise from nvcc -cubin. Skips when neither can be
had; the SASS checks need cuobjdump and nvdisasm (the CUDA toolkit's, or the
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.nvcc import cuda_bin, demangle, disassembler_path, nvcc_cubin

pytestmark = pytest.mark.slow
SOURCES = ("attention_tc_f16.cu", "attention_tc_bf16.cu", "attention_tc_tf32.cu", "patch_text_logits.cu")
ARCHS = ("80", "90")


def resource_report(cubin, path):
    """{mangled kernel: {"registers", "stack", "local"}} from cuobjdump --dump-resource-usage."""
    text = subprocess.run(["cuobjdump", "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                          check=True, env={**os.environ, "PATH": path}).stdout
    report = {}
    for name, reg, stack, local in re.findall(r"Function (\w+):\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text):
        report[name] = {"registers": int(reg), "stack": int(stack), "local": int(local)}
    return report


def built_module():
    try:
        import importlib.util
        spec = importlib.util.find_spec("armfast._C_cuda")
    except ImportError:
        return None
    return Path(spec.origin) if spec and spec.origin else None


@pytest.fixture(scope="session")
def cubins(tmp_path_factory):
    """{(source, arch): (cubin path, resource report)}: extracted from the built module where it
    has them, else compiled (two at a time)."""
    out = tmp_path_factory.mktemp("cubin")
    tools, module, bin_dir = disassembler_path(), built_module(), cuda_bin()
    inside = ""
    if tools and module:
        inside = subprocess.run(["cuobjdump", "--list-elf", str(module)], capture_output=True, text=True,
                                env={**os.environ, "PATH": tools}).stdout

    def get(job):
        source, arch = job
        name = f"{Path(source).stem}.sm_{arch}.cubin"
        if name in inside:
            subprocess.run(["cuobjdump", "--extract-elf", name.removesuffix(".cubin"), str(module)], cwd=out,
                           capture_output=True, check=True, env={**os.environ, "PATH": tools})
            return job, (out / name, resource_report(out / name, tools))
        if bin_dir is None:
            pytest.skip(f"{name}: not in a built armfast._C_cuda, and nvcc not found")
        return job, nvcc_cubin(source, arch, out)

    jobs = [(s, a) for s in SOURCES for a in ARCHS]
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        return dict(pool.map(get, jobs))


def threads_of(kernel: str) -> int:
    """Threads per block the kernel is launched with (its __launch_bounds__), from its name."""
    m = re.search(r"(?:FwdConfig|BwdKVConfig|BwdQConfig)<[^,]+, \d+, (\d+)", kernel)
    return 32 * int(m[1]) if m else 128  # the per-row kernels use 128 threads


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", ARCHS)
def test_no_local_memory_and_registers_within_launch_bounds(cubins, source, arch):
    _, report = cubins[(source, arch)]
    names = demangle(list(report))
    if source.startswith("attention"):
        flash = [k for k in report if "flash_" in names[k]]
        assert len(flash) >= 12, f"expected the forward and backward kernels of 3 head dims, got {sorted(names.values())}"
    for mangled, info in report.items():
        kernel = names[mangled]
        assert info["local"] == 0, f"{kernel} uses local memory (spills): {info}"
        assert info["stack"] == 0, f"{kernel} uses a stack frame: {info}"
        limit = min(255, 65536 // threads_of(kernel))
        assert info["registers"] <= limit, f"{kernel}: {info['registers']} registers > {limit}"
    print(f"\nsm_{arch} {source}:", file=sys.stderr)
    for mangled, info in sorted(report.items(), key=lambda kv: names[kv[0]]):
        print(f"  {info['registers']:3d} registers  {names[mangled]}", file=sys.stderr)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", ARCHS)
def test_sass_runs_on_tensor_cores(cubins, source, arch):
    path = disassembler_path()
    if path is None:
        pytest.skip("cuobjdump/nvdisasm not found")
    cubin, _ = cubins[(source, arch)]
    sass = subprocess.run(["cuobjdump", "--dump-sass", str(cubin)], capture_output=True, text=True, check=True,
                          env={**os.environ, "PATH": path}).stdout
    functions = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        functions[name.strip()] = set(re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", body, re.M))
    names = demangle(list(functions))
    checked = 0
    for mangled, ops in functions.items():
        kernel = names[mangled]
        assert not any(op.startswith(("LDL", "STL")) for op in ops), f"{kernel} uses local memory"
        flash = re.search(r"flash_(fwd|bwd_dkdv|bwd_dq)_kernel", kernel)
        if not (flash or "gemm_tc_kernel" in kernel):
            continue
        checked += 1
        tf32 = "tf32" in source or re.search(r"(Config|gemm_tc_kernel)<float", kernel)
        hmma = [op for op in ops if op.startswith("HMMA")]
        assert hmma, f"{kernel}: no HMMA"
        assert all(op.startswith("HMMA.1688.F32.TF32" if tf32 else "HMMA.16816.F32") for op in hmma), (kernel, hmma)
        if flash:
            assert any(op.startswith("LDGSTS") for op in ops), f"{kernel}: no cp.async (LDGSTS)"
        if not tf32:
            assert any(op.startswith("LDSM") for op in ops), f"{kernel}: no ldmatrix (LDSM)"
    assert checked >= (12 if source.startswith("attention") else 9)
