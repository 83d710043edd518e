"""Whole-image slide inference (armfast.bench.pipeline): the official-style path (float32, one
window at a time), armfast, and armfast with ARM, per protocol; one call segments every
synthetic image of the protocol. The same workloads and check as ``armfast bench --ops
pipeline``; ARMFAST_BENCH_SHAPES=tiny runs the test-sized protocol, ARMFAST_BENCH_DEVICE picks
the device (default: cpu, and cuda if present).
"""
from __future__ import annotations

import os

import pytest
import torch

from armfast.bench import pipeline, timer


def _devices() -> list[str]:
    chosen = os.environ.get("ARMFAST_BENCH_DEVICE")
    return [chosen] if chosen else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params():
    preset = "tiny" if os.environ.get("ARMFAST_BENCH_SHAPES") == "tiny" else "full"
    for device in _devices():
        for case in pipeline.cases(preset):
            for variant in pipeline.VARIANTS:
                mark = pytest.mark.benchmark(timer=timer.device_clock(device),
                                             group=f"pipeline {case.name} {device}")
                yield pytest.param(case, device, variant, marks=mark,
                                   id=f"{device}-{case.name}-{variant}")


_WORKLOADS: dict = {}


def _workload(case, device) -> pipeline.PipelineWorkload:
    """One workload per protocol and device, shared by its variants (same images)."""
    key = (case, device)
    if key not in _WORKLOADS:
        _WORKLOADS.clear()
        _WORKLOADS[key] = pipeline.build(case, device)
    return _WORKLOADS[key]


@pytest.mark.parametrize("case, device, variant", list(_params()))
def test_pipeline(benchmark, case, device, variant):
    work = _workload(case, device)
    if variant == "armfast":  # never time a path that computes something else
        error, agreement = work.check()
        assert error <= pipeline.CHECK_TOLERANCE.get(device, pipeline.CHECK_TOLERANCE["cuda"])
        benchmark.extra_info.update(max_error=error, label_agreement=agreement)
    fn = work.fn(variant)
    if benchmark.disabled:
        benchmark(fn)
        return
    for _ in range(2 if device == "cuda" else 1):  # CUDA graphs are captured at the second call
        fn()
    benchmark.pedantic(fn, rounds=3, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(images=len(work.images), windows=work.windows,
                                images_per_s=len(work.images) / median, device=device)
