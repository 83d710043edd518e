"""Launch configs of the Triton kernels: a short list per GPU family, measured once per size
bucket, remembered on disk.

`triton.autotune` compiles and times every config of a kernel for every new key and forgets the
result when the process ends; its per-call bookkeeping also costs host time that matters when a
kernel runs for microseconds. Here each kernel module offers a few configs per GPU family
(`family()`), the launchers in armfast/ops/_backends/triton/ key them on size buckets
(`bucket()`), and a `Tuner` keeps the winner per key: in memory (one dict lookup per call),
and in a small JSON file shared across processes, keyed by kernel, kernel source, Triton
version and device.

Environment:
  ARMFAST_TRITON_TUNING_CACHE  path of that JSON file (default
                               $XDG_CACHE_HOME/armfast/triton-tuning.json), or "off"
  ARMFAST_TRITON_AUTOTUNE      "0": take each list's first config and measure nothing
Under the Triton interpreter nothing is measured: every kernel runs its interpreter config.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
import triton

from ._common import interpreting

CACHE_ENV = "ARMFAST_TRITON_TUNING_CACHE"
AUTOTUNE_ENV = "ARMFAST_TRITON_AUTOTUNE"
# Each config is timed for about REP_MS after WARMUP_MS: enough to rank configs that differ by
# more than a few percent, short enough that a new bucket costs milliseconds.
WARMUP_MS, REP_MS = 2, 10


@functools.lru_cache(maxsize=4096)  # three per launch: a cached lookup is 4x cheaper than this
def bucket(n: int, smallest: int = 16, largest: int = 1 << 16) -> int:
    """Tuning key of a size: the power of two at or above `n`, clamped to [smallest, largest]
    (sizes below one tile or far beyond the GPU's width tune alike)."""
    return min(max(1 << (n - 1).bit_length(), smallest), largest)


def family(capability: tuple[int, int]) -> str:
    """Which config list a GPU of compute `capability` gets: "sm90" (Hopper and later datacenter
    parts: wgmma, 228 KiB of shared memory per SM), "sm80" (A100-class: mma.sync, 164 KiB) or
    "small" (consumer parts, about 100 KiB)."""
    major, minor = capability
    if major in (9, 10):
        return "sm90"
    if (major, minor) in ((8, 0), (8, 7)):
        return "sm80"
    return "small"


def device_facts(device: torch.device) -> tuple[str, str]:
    """(config family, identity for the disk cache) of a CUDA device. Tests that compile for a
    GPU they do not have replace this."""
    capability = torch.cuda.get_device_capability(device)
    return family(capability), (f"triton {triton.__version__} | "
                                f"{torch.cuda.get_device_name(device)} | "
                                f"sm_{capability[0]}{capability[1]}")


class Launch:
    """One config joined with the constexprs of its key: everything a call passes by keyword,
    and `variant`, which kernel of a family the config is for (its "VARIANT" entry, e.g. "tma";
    None for the plain one)."""

    __slots__ = ("config", "kwargs", "variant")

    def __init__(self, config: triton.Config, constexprs: dict):
        self.config = config
        kwargs = dict(config.kwargs)
        self.variant = kwargs.pop("VARIANT", None)
        self.kwargs = {**constexprs, **kwargs,
                       "num_warps": config.num_warps, "num_stages": config.num_stages}

    def __getitem__(self, name):
        return self.kwargs[name]

    def __repr__(self):
        return f"Launch({self.kwargs})"


def describe(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages}


def measure(fn: Callable[[], None]) -> float:
    """Median time of `fn` in ms (replaced by tests that run without a GPU)."""
    return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


@contextlib.contextmanager
def parallel_compiles(n: int):
    """Compiles the kernels that warm-up launches ask for on `n` threads at once (ptxas runs as a
    subprocess, so this overlaps): a cold first call then waits for the slowest config, not for
    their sum. Sequential where this Triton lacks the (private) async-compile hook."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:
        AsyncCompileMode = active_mode = None
    if AsyncCompileMode is None or n < 2 or active_mode.get() is not None:  # one at a time
        yield
        return
    with ThreadPoolExecutor(max_workers=min(n, os.cpu_count() or 1)) as pool:
        with AsyncCompileMode(pool, ignore_errors=True):  # a failing config is dropped later
            yield


class DiskCache:
    """{device: {entry: chosen config}} in one JSON file, re-read before every write so that
    processes tuning side by side keep each other's entries."""

    def __init__(self):
        self._entries: dict | None = None

    @staticmethod
    def path() -> Path | None:
        where = os.environ.get(CACHE_ENV, "")
        if where.lower() in ("off", "0", "none"):
            return None
        if where:
            return Path(where)
        root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(root) / "armfast" / "triton-tuning.json"

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, device: str, entry: str) -> dict | None:
        path = self.path()
        if path is None:
            return None
        if self._entries is None:
            self._entries = self._read(path)
        return self._entries.get(device, {}).get(entry)

    def put(self, device: str, entry: str, value: dict) -> None:
        path = self.path()
        if path is None:
            return
        entries = self._read(path)
        entries.setdefault(device, {})[entry] = value
        self._entries = entries
        try:  # write aside and rename: readers never see half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                             suffix=".tmp") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.replace(f.name, path)
        except OSError:
            pass  # a read-only cache directory only costs re-tuning in the next process


DISK = DiskCache()


class Tuner:
    """The chosen `Launch` of one kernel (or one kernel sequence) per key.

    Hot path: `tuner.best.get(key)`. On a miss the wrapper calls `tune(key, ...)` with the
    candidate configs and a `run(launch, warmup)` that launches with one of them."""

    def __init__(self, name: str, *kernels):
        self.name = name
        self.best: dict[tuple, Launch] = {}
        self.kernels = kernels  # their source decides whether a remembered choice still holds
        self.measures = 0  # configs timed so far (tests and reports read it)

    @functools.cached_property
    def source_hash(self) -> str:
        sources = "".join(inspect.getsource(getattr(k, "fn", k)) for k in self.kernels)
        return hashlib.sha1(sources.encode()).hexdigest()[:12]

    def tune(self, key: tuple, constexprs: dict,
             candidates: Callable[[str], list[triton.Config]], interpret_config: triton.Config,
             device: torch.device, run: Callable[..., None]) -> Launch:
        """Chooses, remembers and returns the launch of `key` (whose last item is the device
        index) among `candidates(family)`; `run(launch, warmup=False)` launches with one."""
        launch = Launch(self._choose(key, constexprs, candidates, interpret_config, device, run),
                        constexprs)
        self.best[key] = launch
        return launch

    def _choose(self, key, constexprs, candidates, interpret_config, device, run):
        if interpreting():
            return interpret_config
        gpu_family, device_id = device_facts(device)
        configs = candidates(gpu_family)
        if len(configs) == 1 or os.environ.get(AUTOTUNE_ENV, "1") == "0":
            return configs[0]
        known = DISK.get(device_id, f"{self.name} {self.source_hash} {_key_text(key[:-1])}")
        for config in configs:
            if known is not None and describe(config) == known.get("config"):
                return config
        launches = [Launch(config, constexprs) for config in configs]
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            with parallel_compiles(len(launches)):
                for launch in launches:
                    run(launch, warmup=True)
            times = [self._time(run, launch) for launch in launches]
        return self._remember(device_id, key, configs, times)

    def _remember(self, device_id: str, key: tuple, configs: list, times: list[float]):
        """The fastest of `configs` (timed `times`), written to the disk cache for `key`."""
        best = min(range(len(configs)), key=times.__getitem__)
        if not math.isfinite(times[best]):
            raise RuntimeError(f"{self.name}: no launch config ran for key {key}")
        DISK.put(device_id, f"{self.name} {self.source_hash} {_key_text(key[:-1])}",
                 {"config": describe(configs[best]),
                  "ms": [round(t, 5) if math.isfinite(t) else None for t in times]})
        return configs[best]

    def sweep(self, key: tuple, constexprs: dict, configs: list[triton.Config], device_id: str,
              run: Callable[..., None], timer: Callable[[Callable[[], None]], float] = measure
              ) -> list[float]:
        """Times every one of `configs` for `key` with `timer` (a longer measurement than a cold
        call's), remembers the fastest in memory and on disk, where `tune` finds it in the next
        process, and returns the times in ms (inf: the config failed, e.g. out of resources).
        benchmarks/bwd_sweep.py runs it on a GPU."""
        launches = [Launch(config, constexprs) for config in configs]
        if not interpreting():  # compiled side by side, outside the timing, as `tune` does
            with parallel_compiles(len(launches)):
                for launch in launches:
                    with contextlib.suppress(Exception):  # it fails again, timed: inf
                        run(launch, warmup=True)
        times = []
        for launch in launches:
            try:
                times.append(timer(functools.partial(run, launch)))
            except Exception:  # noqa: BLE001  (as in `_time`: a config this GPU cannot run)
                times.append(math.inf)
        self.measures += len(configs)
        self.best[key] = Launch(self._remember(device_id, key, configs, times), constexprs)
        return times

    def _time(self, run, launch: Launch) -> float:
        self.measures += 1
        try:
            return measure(lambda: run(launch))
        except Exception:  # e.g. OutOfResources: the config does not fit this GPU
            return math.inf


def _key_text(key: tuple) -> str:
    return "(" + ", ".join(str(k).replace("torch.", "") for k in key) + ")"
