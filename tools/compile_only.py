"""The real GPU launch path without a GPU: a stand-in for Triton's CUDA driver.

Inside `compile_only(arch)`, armfast's triton backend (armfast/ops/_backends/triton/), its tuner
and Triton's JIT run as they would on a GPU of compute capability `arch`, on CPU tensors: arguments
are specialised as at run time, kernels are compiled for that GPU (Triton ships ptxas), and every
launch only records what it would have run. What this gives without a GPU:
  - compiled kernels: PTX, registers, spill bytes, shared memory, per config (`Driver.kernels`);
  - compile counts (`Driver.compiles`, from Triton's post-compile hook);
  - the host cost of the launch path, less the driver's own launch call.
Run with TRITON_INTERPRET unset (the interpreter builds no GPU code). For the compile scripts
beside it and the compile-only tests (tests/triton/test_triton_compile.py): this leans on the
driver interface Triton's JIT and CompiledKernel call (the same in Triton 3.6 and 3.8).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

# Per-block shared memory limits (opt-in) of the families the config lists target.
MAX_SHARED = {90: 232448, 80: 166912, 86: 101376, 89: 101376}


@dataclass
class Kernel:
    """One compiled kernel, as loaded for a launch."""
    name: str
    constants: dict  # constexpr name -> value (BLOCK_M, HEAD_DIM, ...)
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per program
    registers: int
    spill_bytes: int  # ptxas stack frame: spilled registers (the kernels declare no local arrays)
    ptx: str

    @property
    def wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    @property
    def mma_sync(self) -> bool:
        return "mma.sync" in self.ptx

    @property
    def tma(self) -> bool:
        return "cp.async.bulk.tensor" in self.ptx

    @property
    def local_memory(self) -> bool:
        """Whether the PTX itself declares or touches local memory (ptxas spills show up in
        `spill_bytes` instead)."""
        return re.search(r"\.local\b|ld\.local|st\.local", self.ptx) is not None

    @property
    def config(self) -> str:
        tiles = {k: v for k, v in self.constants.items() if k.startswith("BLOCK_")}
        return f"{tiles} warps={self.num_warps} stages={self.num_stages}"


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the kernel in `cubin`, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return int(registers.group(1)), int(stack.group(1))


class _Utils:
    def __init__(self, driver: "Driver"):
        self.driver = driver

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED.get(self.driver.target.arch, 101376),
                "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, cubin, shared, device):
        registers, stack = resource_usage(cubin)
        self.driver._loaded(name, shared, registers, stack)
        return object(), 0, registers, stack, 1024  # module, function, regs, spills, threads

    def unload_module(self, module):
        pass


class Driver:
    """Answers Triton's JIT as a CUDA driver on a GPU of `arch` would; launches nothing."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(self)
        self.kernels: list[Kernel] = []
        self.compiles: Counter[str] = Counter()  # kernel name -> compiles
        self.launches: Counter[str] = Counter()  # kernel name -> launches
        self._pending = None  # (src, metadata, ptx) of the kernel being loaded

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        self._pending = (src, metadata)
        name = src.name

        def launch(*args):
            self.launches[name] += 1
        return launch

    def _loaded(self, name, shared, registers, stack):
        src, metadata, ptx = self._pending
        constants = {src.fn.arg_names[path[0]]: value for path, value in src.constants.items()}
        self.kernels.append(Kernel(name, constants, metadata.num_warps, metadata.num_stages,
                                   shared, registers, stack, ptx))

    def _load_start(self, module, function, name, metadata_group, hash):
        ptx_path = next((p for f, p in metadata_group.items() if f.endswith(".ptx")), None)
        self._pending = (*self._pending, Path(ptx_path).read_text() if ptx_path else "")

    def _compiled(self, *, fn, **kwargs):
        self.compiles[fn.name] += 1


def _measure_first_wins(fn):
    """Tuner timing stand-in: launch once (loading the kernel, i.e. recording its facts) and
    report the same time for every config, so the tuner keeps each list's first config."""
    fn()
    return 1.0


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Within: the triton backend launches on CPU tensors as on a GPU of compute capability
    `arch`; yields the `Driver` that records kernels, compiles and launches. Tuning measures
    nothing (first config wins, after every candidate compiled) and the on-disk tuning cache
    is off."""
    from triton import knobs
    from triton.runtime import driver as active

    from armfast.kernels import _common, _tuning
    if _common.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter builds no GPU code")
    from armfast.ops._backends import triton as _triton
    fake = Driver(arch)
    _triton.clear_tuners()  # fresh tuners: nothing chosen for another GPU survives
    saved = (knobs.runtime.kernel_load_start_hook, knobs.runtime.jit_post_compile_hook,
             _tuning.measure, _tuning.device_facts, os.environ.get(_tuning.CACHE_ENV),
             os.environ.get(_tuning.AUTOTUNE_ENV))
    active.set_active(fake)
    knobs.runtime.kernel_load_start_hook = fake._load_start
    knobs.runtime.jit_post_compile_hook = fake._compiled
    _tuning.measure = _measure_first_wins
    _tuning.device_facts = lambda device: (_tuning.family((arch // 10, arch % 10)),
                                           f"compile-only sm_{arch}")
    os.environ[_tuning.CACHE_ENV] = "off"
    os.environ[_tuning.AUTOTUNE_ENV] = "1"  # every candidate compiles (and loads) once
    try:
        yield fake
    finally:
        _triton.clear_tuners()
        active.reset_active() if _has_default_driver(active) else setattr(active, "_active", None)
        (knobs.runtime.kernel_load_start_hook, knobs.runtime.jit_post_compile_hook,
         _tuning.measure, _tuning.device_facts, cache, autotune) = saved
        for name, value in ((_tuning.CACHE_ENV, cache), (_tuning.AUTOTUNE_ENV, autotune)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _has_default_driver(active) -> bool:
    try:
        active.default
        return True
    except RuntimeError:  # no CUDA driver on this machine
        return False
