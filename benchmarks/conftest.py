"""pytest-benchmark suites of armfast: every backend available on each device, against the
reference and SDPA, on the same inputs, one benchmark group per op, mode, shape and device.

The measuring code is armfast.bench, shared with `armfast bench`: the same cases, inputs and
correctness check, and the same timing protocol (rounds of back-to-back calls with the device
synchronised once per round, through pytest-benchmark's `timer` and `iterations`).

    pytest benchmarks                          design shapes, full timing
    pytest benchmarks --benchmark-disable      quick shapes, every case run and checked once
    ARMFAST_BENCH_SHAPES=full|quick|tiny        choose the shapes explicitly
    ARMFAST_BENCH_QUICK=1                       quick shapes, short timing
    ARMFAST_BENCH_DEVICE=cpu|cuda               one device (default: cpu, and cuda if present)
    ARMFAST_BENCH_DTYPE=float32|bfloat16|...    default float32 on CPU, bfloat16 on CUDA
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import pytest
import torch

from armfast.bench import memory, timer
from armfast.bench.cases import Case, default_dtype, make_cases
from armfast.bench.runner import config_after_check, device_name, not_timed_reason, select_backends
from armfast.bench.workloads import Unavailable, build, clear_caches
from armfast.cli.bench import DTYPES
from armfast.ops import backend_status


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_op(op): the armfast.bench op a module benchmarks")


def _preset(config) -> str:
    preset = os.environ.get("ARMFAST_BENCH_SHAPES")
    if preset:
        return preset
    disabled = config.getoption("benchmark_disable", False) and not config.getoption(
        "benchmark_enable", False)
    return "quick" if disabled or _flag("ARMFAST_BENCH_QUICK") else "full"


def _devices() -> list[str]:
    chosen = os.environ.get("ARMFAST_BENCH_DEVICE")
    if chosen:
        if chosen not in ("cpu", "cuda"):
            raise pytest.UsageError(f"ARMFAST_BENCH_DEVICE must be cpu or cuda; got {chosen!r}")
        return [chosen]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _dtype(device: str) -> torch.dtype:
    name = os.environ.get("ARMFAST_BENCH_DTYPE")
    if not name:
        return default_dtype(device)
    if name not in DTYPES:
        raise pytest.UsageError(f"ARMFAST_BENCH_DTYPE must be one of {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, name)


def _timer_config() -> timer.TimerConfig:
    return timer.QUICK if _flag("ARMFAST_BENCH_QUICK") else timer.FULL


@dataclass(frozen=True)
class BenchParam:
    case: Case
    device: str
    backend: str

    @property
    def id(self) -> str:
        return f"{self.device}-{self.case.id}-{self.backend}"


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("bench_op")
    if marker is None or "param" not in metafunc.fixturenames:
        return
    op, modes = marker.args[0], marker.kwargs.get("modes", ("forward", "train"))
    preset = _preset(metafunc.config)
    params = []
    for device in _devices():
        dtype = _dtype(device)
        for case in make_cases([op], preset, dtype=dtype, modes=modes):
            for backend in select_backends(device):  # reference first: its outputs are the truth
                p = BenchParam(case, device, backend)
                # pytest-benchmark reads its clock at round boundaries: a clock that first
                # synchronises the device makes a round of `iterations` calls one sync
                mark = pytest.mark.benchmark(timer=timer.device_clock(device),
                                             group=f"{case.group} [{case.label}] {device}")
                params.append(pytest.param(p, id=p.id, marks=mark))
    metafunc.parametrize("param", params)


class _WorkloadCache:
    """The workload of the last case: the backends of one case run one after the other, on the
    same inputs, and the reference outputs are computed once."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, case: Case, device: str):
        if self.key != (case, device):
            self.key, self.value = None, None
            gc.collect()
            self.value = build(case, device)  # Unavailable propagates: the test skips
            self.key = (case, device)
        return self.value


@pytest.fixture(scope="session")
def workloads():
    cache = _WorkloadCache()
    yield cache
    clear_caches()


@pytest.fixture
def bench(benchmark, workloads):
    """``bench(param)``: check the backend against the reference, time it, record metrics."""

    def run(param: BenchParam):
        case, device, backend = param.case, param.device, param.backend
        reason = backend_status(device)[backend] or not_timed_reason(backend, device)
        if reason:
            pytest.skip(reason)
        try:
            workload = workloads.get(case, device)
        except Unavailable as exc:
            pytest.skip(str(exc))
        max_error = workload.check(backend)  # raises CheckFailed: never time wrong results
        fn = workload.fn(backend)
        if benchmark.disabled:
            benchmark(fn)  # one call, no timing
            return
        plan = timer.plan(fn, device, config_after_check(workload, _timer_config()))
        benchmark.pedantic(fn, rounds=plan.rounds, iterations=plan.calls)
        median = benchmark.stats.stats.median
        floor = case.min_bytes
        benchmark.extra_info.update({
            "backend": backend,
            "device": device,
            "device_name": device_name(device),
            "dtype": str(case.dtype).replace("torch.", ""),
            "shape": case.label,
            "tflops": case.flops / median / 1e12,
            "gbps": None if floor is None else floor / median / 1e9,
            "peak_bytes": memory.peak_memory(fn, device),
            "max_error": max_error,
            "flops": case.flops,
            "min_bytes": floor,
        })
    return run
