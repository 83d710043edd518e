"""The compute ceiling of the benchmark table: the larger of a matmul and, on the CPU, the FMA
units' measured peak (armfast._C.fma_peak). No timing assertions: the kernel's FLOP bookkeeping,
which ceiling is used, and the percentages from synthetic numbers."""
from __future__ import annotations

import pytest
import torch

from armfast import ops
from armfast.bench import ceilings, report, timer
from armfast.bench.cases import Case
from armfast.bench.ceilings import Ceilings, compute_ceiling
from armfast.bench.runner import Result

needs_cpu_extension = pytest.mark.skipif(ops.backend_status("cpu")["cpu"] is not None,
                                         reason="armfast._C (the cpu backend) is not built")

# (chains, float32 lanes) of each instruction set's FMA loop (csrc/cpu/peak.cpp)
FMA_SHAPE = {"avx512": (16, 16), "avx2": (12, 8), "generic": (12, 4)}


@needs_cpu_extension
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fma_peak_counts_its_flops(isa, dtype, monkeypatch):
    monkeypatch.setenv("ARMFAST_CPU_ISA", isa)  # the CPU may lack it: then its best one runs
    from armfast import _C
    threads = min(2, _C.build_info()["max_threads"])
    iterations = 1000
    r = _C.fma_peak(dtype, iterations, threads)
    chains, lanes = FMA_SHAPE[_C.isa()]
    lanes //= 2 if dtype == "float64" else 1
    assert (r["chains"], r["lanes"], r["threads"]) == (chains, lanes, threads)
    assert r["flops"] == 2 * threads * iterations * chains * lanes
    assert r["seconds"] > 0
    # every chain: x <- 0.999 x + 0.001 from x = c, so after n rounds 1 + (c - 1) 0.999^n; the
    # sum over chains, lanes and threads proves each round ran (a dropped one shifts it)
    decay = 0.999 ** iterations
    expected = threads * lanes * sum(1 + (c - 1) * decay for c in range(chains))
    assert r["checksum"] == pytest.approx(expected, rel=1e-3)


@needs_cpu_extension
def test_fma_peak_rejects_bad_arguments():
    from armfast import _C
    with pytest.raises(ValueError, match="iterations"):
        _C.fma_peak("float32", 0, 1)
    with pytest.raises(TypeError, match="float16"):
        _C.fma_peak("float16", 10, 1)


@needs_cpu_extension
def test_cpu_ceilings_use_the_larger_of_matmul_and_fma_peak(monkeypatch):
    from armfast import _C
    # small sizes: only what is measured and which one is used is checked here
    monkeypatch.setitem(ceilings.SIZES, "cpu", {"quick": (128, 1 << 16), "full": (128, 1 << 16)})
    monkeypatch.setitem(ceilings.FMA_ITERATIONS, "quick", 1 << 12)
    c = ceilings.measure_ceilings("cpu", torch.float32, timer.QUICK, quick=True)
    assert c.matmul_tflops > 0 and c.peak_tflops > 0 and c.peak_isa == _C.isa()
    assert c.compute_tflops == max(c.matmul_tflops, c.peak_tflops)
    assert "FMA peak" in c.summary()
    # no FMA kernel for bfloat16: the matmul alone is the ceiling
    assert ceilings.fma_peak(torch.bfloat16, 1 << 10, 1) is None


def test_compute_ceiling_is_the_max_and_reads_old_json():
    assert compute_ceiling({"matmul_tflops": 0.2, "peak_tflops": 0.56}) == 0.56
    assert compute_ceiling({"matmul_tflops": 0.9, "peak_tflops": 0.56}) == 0.9  # GPU-like
    assert compute_ceiling({"matmul_tflops": 0.2}) == 0.2  # stored before the FMA peak
    assert compute_ceiling({"matmul_tflops": 0.2, "peak_tflops": None}) == 0.2
    assert compute_ceiling(None) is None and compute_ceiling({}) is None
    low = Ceilings(0.2, 30.0, 3072, 1, "float32", peak_tflops=0.5, peak_isa="avx512")
    high = Ceilings(0.1, 20.0, 3072, 1, "float32", peak_tflops=0.56, peak_isa="avx512")
    best = low.best(high)
    assert (best.matmul_tflops, best.peak_tflops, best.compute_tflops) == (0.2, 0.56, 0.56)
    assert low.best(Ceilings(0.3, 1.0, 3072, 1, "float32")).peak_tflops == 0.5


def _row_at(tflops: float, ceiling: dict) -> str:
    """'% mm peak' of a result running at `tflops`."""
    case = Case("attention", "forward", (("B", 1), ("H", 12), ("Nq", 785), ("Nk", 785), ("d", 64)))
    result = Result(case, "cpu", "cpu", timer.Timing((case.flops / (tflops * 1e12),), 1))
    return report.rows([result.to_dict()], ceiling)[0]["% mm peak"]


def test_no_row_exceeds_the_compute_ceiling():
    # a kernel at twice the matmul's rate, as the CPU kernels ran against torch's matmul
    matmul, peak, kernel = 0.21, 0.56, 0.43
    assert _row_at(kernel, {"matmul_tflops": matmul}) == "204.8%"  # the old, false ceiling
    assert _row_at(kernel, {"matmul_tflops": matmul, "peak_tflops": peak}) == "76.8%"
    # a kernel can at best reach the FMA peak: 100%, never more
    assert _row_at(peak, {"matmul_tflops": matmul, "peak_tflops": peak}) == "100.0%"


def test_markdown_section_shows_both_ceilings_and_renders_old_json():
    env = {"device": "cpu", "device_name": "x", "cpu_count": 2, "torch_threads": 2, "date": "d",
           "armfast": "0", "torch": "t", "triton": "t", "open_clip": "o", "python": "p",
           "backends": {"cpu": None}}
    old = {"matmul_tflops": 0.21, "copy_gbps": 20.0, "matmul_n": 3072, "copy_bytes": 1 << 26,
           "dtype": "float32"}
    data = {"command": "armfast bench", "environment": env, "ceilings": old, "results": []}
    text = report.markdown_section(data, "CPU")
    assert "matmul 0.21 TFLOP/s" in text and "FMA peak" not in text
    data["ceilings"] = dict(old, peak_tflops=0.56, peak_isa="avx512")
    text = report.markdown_section(data, "CPU")
    assert "matmul 0.21 TFLOP/s" in text and "FMA peak 0.56 TFLOP/s (avx512)" in text
