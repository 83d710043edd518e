"""Runs benchmark cases on every backend of a device: check, time, peak memory.

This is what `armfast bench` calls; the pytest-benchmark suites in benchmarks/ use the same
pieces (`workloads.build`, `Workload.check`, `timer.plan` and `device_clock`, `peak_memory`),
so both measure the same thing.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from .._version import __version__
from ..ops import available_backends, backend_status
from .cases import Case
from .memory import peak_memory
from .timer import FULL, Timing, TimerConfig, measure
from .workloads import CheckFailed, Unavailable, build, clear_caches

# Backends that can run on a device but whose timing there would not mean anything.
NOT_TIMED = {
    ("triton", "cpu"): "Triton on CPU runs under the interpreter (TRITON_INTERPRET=1): its time "
                       "is numpy's, not a kernel's",
}
PEERS = ("reference", "sdpa")  # every run includes them: the ratios are against them


def not_timed_reason(backend: str, device: str | torch.device) -> Optional[str]:
    return NOT_TIMED.get((backend, torch.device(device).type))


@dataclass
class Result:
    case: Case
    device: str
    backend: str
    timing: Optional[Timing] = None
    peak_bytes: Optional[int] = None
    max_error: Optional[float] = None
    skipped: Optional[str] = None  # why it was not run
    error: Optional[str] = None  # what went wrong (wrong numbers, an exception)

    @property
    def median_s(self) -> Optional[float]:
        return None if self.timing is None else self.timing.median_s

    @property
    def tflops(self) -> Optional[float]:
        return None if self.timing is None else self.case.flops / self.median_s / 1e12

    @property
    def gbps(self) -> Optional[float]:
        floor = self.case.min_bytes
        return None if self.timing is None or floor is None else floor / self.median_s / 1e9

    def to_dict(self) -> dict:
        c = self.case
        return {"op": c.op, "mode": c.mode, "variant": c.variant, "shape": c.shape,
                "label": c.label, "dtype": str(c.dtype).replace("torch.", ""),
                "device": self.device, "backend": self.backend, "flops": c.flops,
                "min_bytes": c.min_bytes, **(self.timing.to_dict() if self.timing else {}),
                "tflops": self.tflops, "gbps": self.gbps, "peak_bytes": self.peak_bytes,
                "max_error": self.max_error, "skipped": self.skipped, "error": self.error}


def select_backends(device: str | torch.device, requested: Optional[Iterable[str]] = None) -> list[str]:
    """reference and sdpa, then the requested backends (default: all available on `device`)."""
    names = list(PEERS)
    requested = available_backends(device) if requested is None else list(requested)
    return names + [b for b in requested if b not in names]


def config_after_check(workload, config: TimerConfig) -> TimerConfig:
    """No separate warm-up when the correctness check has just run the timed computation."""
    return dataclasses.replace(config, warmup=0) if workload.check_warms_up else config


def run_backend(workload, backend: str, config: TimerConfig, *, memory: bool = True) -> Result:
    """Checks `backend` on `workload` against the reference, then times it and measures its
    peak memory. Problems are reported in the Result, never raised."""
    case, device = workload.case, workload.device
    result = Result(case, str(device), backend)
    reason = backend_status(device).get(backend, f"unknown backend {backend!r}")
    result.skipped = reason or not_timed_reason(backend, device)
    if result.skipped:
        return result
    try:
        result.max_error = workload.check(backend)
        fn = workload.fn(backend)
        result.timing = measure(fn, device, config_after_check(workload, config))
        if memory:
            result.peak_bytes = peak_memory(fn, device)
    except CheckFailed as exc:
        result.error = str(exc)
    except Exception as exc:  # a backend that raises must not stop the other measurements
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def run(cases: Iterable[Case], device: str | torch.device, *, backends: Optional[Iterable[str]] = None,
        config: TimerConfig = FULL, memory: bool = True,
        progress: Optional[Callable[[Result], None]] = None) -> list[Result]:
    """Every case on every selected backend of `device`; `progress` sees each result."""
    device = torch.device(device)
    names = select_backends(device, backends)
    results = []
    for case in cases:
        try:
            workload = build(case, device)
        except Unavailable as exc:
            workload, skipped = None, str(exc)
        for backend in names:
            if workload is None:
                result = Result(case, str(device), backend, skipped=skipped)
            else:
                result = run_backend(workload, backend, config, memory=memory)
            results.append(result)
            if progress is not None:
                progress(result)
        del workload  # release one case's tensors before building the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    clear_caches()
    return results


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # absent or broken: record that, do not fail the run
        return None


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_commit() -> Optional[str]:
    """The commit of the code measured: ARMFAST_SOURCE_COMMIT (the GPU check sets it; a copied
    tree may have no .git), else the git checkout armfast runs from (an editable install), else
    None."""
    commit = os.environ.get("ARMFAST_SOURCE_COMMIT")
    if commit:
        return commit
    import subprocess
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=os.path.dirname(__file__))
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def environment(device: str | torch.device) -> dict:
    """What the numbers depend on: hardware, software versions, date."""
    device = torch.device(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "open_clip": _version("open_clip"),
        "armfast": __version__,
        "commit": source_commit(),
        "backends": backend_status(device),
        "argv": sys.argv,
        # the machine may be shared: a busy one makes every number slower and noisier
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env
