"""Build of armfast: the Python package plus the pybind11 extension in csrc/.

The extension never includes or links libtorch: kernels take raw pointers, sizes, strides and a
CUDA stream handle, so a build made in an isolated environment loads under any torch.

  armfast._C       C++/OpenMP CPU kernels (always built)
  armfast._C_cuda  CUDA kernels (built when nvcc is found; static CUDA runtime)

Environment:
  ARMFAST_NO_CUDA=1               skip the CUDA module even when nvcc is present
  ARMFAST_CUDA_ARCH_LIST          CUDA targets, e.g. "8.0;9.0a;9.0+PTX"; default "8.0;9.0+PTX":
                                  SASS for sm_80 (also runs on sm_86/sm_87/sm_89: A10, RTX 30xx,
                                  L4, RTX 40xx) and sm_90 (H100/H200), plus compute_90 PTX that the
                                  driver compiles for newer GPUs (Blackwell). Every kernel is
                                  compiled once per entry, so the list sets the build time.
  CUDA_HOME / CUDA_PATH           where to look for nvcc before PATH and /usr/local/cuda
  ARMFAST_NVCC_THREADS            parallel nvcc jobs (default: number of CPUs)
"""
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def read_version() -> str:
    text = (ROOT / "armfast" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def flag_set(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def find_cuda_home():
    if flag_set("ARMFAST_NO_CUDA"):
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for base in candidates:  # a real toolkit has nvcc and the runtime headers side by side
        if base and (Path(base) / "bin" / "nvcc").exists() \
                and (Path(base) / "include" / "cuda_runtime_api.h").exists():
            return Path(base)
    return None


def cuda_targets(arch_list: str) -> list:
    """"8.0;9.0a;9.0+PTX" -> [("80", False), ("90a", False), ("90", True)]: (sm, with PTX)
    (the syntax of TORCH_CUDA_ARCH_LIST)."""
    targets = []
    for item in filter(None, re.split(r"[;,\s]+", arch_list.strip())):
        ptx = item.endswith("+PTX")
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", item[:-4] if ptx else item)
        if m is None:
            raise SystemExit(f"ARMFAST_CUDA_ARCH_LIST: cannot parse {item!r}; expected entries "
                             f"like 8.0, 9.0a or 9.0+PTX separated by ';'")
        targets.append((f"{m[1]}{m[2]}{m[3]}", ptx))
    if not targets:
        raise SystemExit("ARMFAST_CUDA_ARCH_LIST is empty")
    return targets


def gencode_flags(targets: list) -> list:
    flags = []
    for sm, ptx in targets:
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    return flags


class BuildExt(build_ext):
    """build_ext that compiles .cu sources with nvcc (in parallel) before the usual link."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = self.compile_cuda(ext, cu_sources) + list(ext.extra_objects)
        super().build_extension(ext)

    def compile_cuda(self, ext, sources):
        nvcc = str(ext.cuda_home / "bin" / "nvcc")
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        includes = [f"-I{d}" for d in ext.include_dirs]
        flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DNDEBUG",
                 "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                 *gencode_flags(cuda_targets(ext.cuda_archs))]

        def compile_one(src):
            obj = out_dir / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", src, "-o", str(obj), *includes, *flags]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return str(obj)

        jobs = int(os.environ.get("ARMFAST_NVCC_THREADS", os.cpu_count() or 1))
        try:
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                return list(pool.map(compile_one, sources))
        except subprocess.CalledProcessError as exc:
            raise SystemExit(
                f"nvcc failed on {exc.cmd[2]}. Set ARMFAST_NO_CUDA=1 to build the CPU backend only, "
                f"or ARMFAST_CUDA_ARCH_LIST to targets your nvcc supports.") from exc


def project_files(folder: str, *patterns: str) -> list:
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in (ROOT / folder).glob(pattern))


def extensions():
    include = [str(ROOT / "csrc" / "include")]
    # Headers (and .cu files, which BuildExt compiles apart) as `depends`: editing only one of them
    # still rebuilds the module, and sdists carry them.
    shared_headers = project_files("csrc/include/armfast", "*.h", "*.cuh")
    cpu = Pybind11Extension(
        "armfast._C",
        project_files("csrc/cpu", "*.cpp"),
        depends=project_files("csrc/cpu", "*.h") + shared_headers,
        include_dirs=include,
        cxx_std=17,
        # -fno-trapping-math lets `omp simd` vectorise the softmax's branch-free selects (no code
        # here reads floating-point exception flags).
        extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math"],
        extra_link_args=["-fopenmp"],
    )
    exts = [cpu]
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        archs = os.environ.get("ARMFAST_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources = project_files("csrc/cuda", "*.cu", "*.cpp")
        cuda = Pybind11Extension(
            "armfast._C_cuda",
            sources,
            depends=project_files("csrc/cuda", "*.cu", "*.cuh", "*.h") + shared_headers,
            include_dirs=include + [str(cuda_home / "include")],
            library_dirs=[str(cuda_home / "lib64")],
            libraries=["cudart_static", "rt", "pthread", "dl"],
            define_macros=[("ARMFAST_CUDA_ARCHS", f'"{archs}"')],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
        cuda.cuda_home, cuda.cuda_archs = cuda_home, archs
        exts.append(cuda)
        print(f"armfast: building the CUDA module with {cuda_home / 'bin' / 'nvcc'} for {archs}")
    else:
        print("armfast: nvcc not found or ARMFAST_NO_CUDA set; building the CPU module only")
    return exts


setup(
    version=read_version(),
    packages=["armfast"] + [f"armfast.{p}" for p in find_packages("armfast")]
    + ["armfast.kernels"] + [f"armfast.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"armfast": "armfast", "armfast.kernels": "kernels"},
    package_data={"armfast.data": ["classnames/*.txt"], "armfast.ops": ["auto_table.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
