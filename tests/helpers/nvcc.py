"""The CUDA toolkit for the compile-only tests: nvcc, cuobjdump/nvdisasm, and the cubin of one
source of csrc/cuda with ptxas's resource report."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository


def cuda_bin():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for base in filter(None, candidates):
        if (Path(base) / "bin" / "nvcc").exists():
            return Path(base) / "bin"
    return None


def disassembler_path():
    """A PATH on which cuobjdump and nvdisasm both exist, or None."""
    dirs = [str(d) for d in (cuda_bin(),) if d] + os.environ.get("PATH", "").split(os.pathsep)
    try:  # the pip wheels put them in site-packages/nvidia/cu*/bin
        import nvidia
        dirs += [str(p) for root in nvidia.__path__ for p in Path(root).glob("cu*/bin")]
    except ImportError:
        pass
    for d in dirs:
        if (Path(d) / "cuobjdump").exists() and (Path(d) / "nvdisasm").exists():
            return os.pathsep.join([d] + dirs)
    return None


def demangle(names):
    tool = shutil.which("c++filt")
    if tool is None:
        return dict(zip(names, names))
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def ptxas_report(stderr):
    """{mangled kernel: {"registers", "stack", "local"}} from nvcc -Xptxas -v."""
    report, current = {}, None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = report.setdefault(m[1], {})
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m[1]), local=int(m[2]) + int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m[1])
    return report


def nvcc_cubin(source: str, arch: str, out: Path):
    """csrc/cuda/`source` compiled with nvcc -cubin for sm_`arch` into folder `out`: (cubin path,
    resource report from -Xptxas -v). Skips when nvcc is not found."""
    bin_dir = cuda_bin()
    if bin_dir is None:
        pytest.skip("nvcc not found")
    cubin = out / f"{Path(source).stem}.sm_{arch}.cubin"
    cmd = [str(bin_dir / "nvcc"), "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
           "-DNDEBUG", "-Xptxas", "-v", f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}",
           str(ROOT / "csrc" / "cuda" / source), "-o", str(cubin)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    return cubin, ptxas_report(result.stderr)
