"""armfast.bench and `armfast bench`: case definitions, FLOP counts, table formatting, a smoke
run on tiny shapes. No timing assertions: only that the measurements exist and are sane."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from armfast.bench import cases, memory, report, timer, workloads
from armfast.bench.cases import BASELINE_OPS, Case, make_cases
from armfast.bench.runner import Result, run, select_backends
from armfast.cli import main

ROOT = Path(__file__).resolve().parents[2]


# ---- case definitions and work counts ----------------------------------------------------

def test_attention_counts_follow_the_contract():
    # 4 Nq Nk d per head forward, backward 2.5x forward
    assert cases.attention_flops(2, 3, 5, 7, 64) == 2 * 3 * 4 * 5 * 7 * 64
    assert cases.attention_flops(2, 3, 5, 7, 64, backward=True) == 3.5 * 2 * 3 * 4 * 5 * 7 * 64
    # (2 Nq + 2 Nk) d elements per head forward; backward adds (4 Nq + 4 Nk) d
    assert cases.attention_bytes(2, 3, 5, 7, 64, 4) == 2 * 3 * (2 * 5 + 2 * 7) * 64 * 4
    assert cases.attention_bytes(2, 3, 5, 7, 64, 2, backward=True) == 2 * 3 * (6 * 5 + 6 * 7) * 64 * 2


def test_patch_text_logits_counts():
    B, N, C, E = 2, 196, 171, 512
    assert cases.patch_text_logits_flops(B, N, C, E) == 2 * B * N * C * E
    assert cases.patch_text_logits_flops(B, N, C, E, backward=True) == 6 * B * N * C * E
    assert cases.patch_text_logits_bytes(B, N, C, E, 4) == (B * N * E + C * E + B * N * C) * 4
    assert cases.patch_text_logits_bytes(B, N, C, E, 4, backward=True) == \
        (3 * B * N * E + 3 * C * E + 2 * B * N * C) * 4


def test_tokens_of_vit_b16_crops():
    assert [cases.tokens(c) for c in cases.CROPS] == [196, 441, 784]


def test_case_properties():
    case = Case("attention", "train", (("B", 16), ("H", 12), ("Nq", 785), ("Nk", 785), ("d", 64)),
                torch.bfloat16)
    assert case.label == "B=16 H=12 N=785 d=64"
    assert case.flops == cases.attention_flops(16, 12, 785, 785, 64, backward=True)
    assert case.min_bytes == cases.attention_bytes(16, 12, 785, 785, 64, 2, backward=True)
    assert case.group == "attention train"
    assert case.id == "attention-train-B16-H12-Nq785-Nk785-d64-bfloat16"
    cross = Case("attention", "forward", (("B", 1), ("H", 8), ("Nq", 196), ("Nk", 441), ("d", 64)))
    assert cross.label == "B=1 H=8 Nq=196 Nk=441 d=64"
    arm = make_cases(["arm"], "full", modes=["forward"])[0]
    assert arm.min_bytes is None and arm.flops > 0


def test_case_rejects_bad_arguments():
    with pytest.raises(ValueError, match="op must be one of"):
        Case("softmax", "forward", ())
    with pytest.raises(ValueError, match="mode must be one of"):
        Case("attention", "backward", ())
    with pytest.raises(ValueError, match="clip cases are inference only"):
        Case("clip", "train", ())
    with pytest.raises(ValueError, match="ops must be drawn from"):
        make_cases(["attention", "conv"])
    with pytest.raises(ValueError, match="preset must be one of"):
        make_cases(preset="huge")


def test_full_preset_covers_the_design_shapes():
    full = make_cases(preset="full")
    att = [c.shape for c in full if c.op == "attention" and c.mode == "forward"]
    # batch 1 and 16 x crops 224/336/448; H=8 (ARM, patch tokens) and H=12 (CLIP, with CLS)
    assert {(s["B"], s["H"], s["Nq"]) for s in att} == {
        (B, H, N + (H == 12)) for B in (1, 16) for H in (8, 12) for N in (196, 441, 784)}
    assert all(s["d"] == 64 for s in att)
    clip = [c for c in full if c.op == "clip"]
    assert {c.variant for c in clip} == {"sclip", "sclip+arm"} and all(c.mode == "forward" for c in clip)
    assert {(c.op, c.mode) for c in full} >= {("patch_text_logits", "train"), ("arm", "train")}


class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of the matrix products torch runs (2 per multiply-add), from the shapes of
    the aten ops every matmul, linear layer and convolution reaches: an independent count of
    what the formulas of armfast.bench.cases claim, which does not depend on which ops torch's
    own FLOP counter knows (SDPA is avoided: the workloads run on the reference backend, whose
    attention is written out as matmuls). Any other op that multiplies matrices is recorded in
    `unknown`, so a matmul this counter cannot see fails the test instead of going uncounted."""

    SUSPECT = ("mm", "matmul", "linear", "conv", "attention", "einsum", "dot", "mv")

    def __init__(self):
        super().__init__()
        self.flops, self.unknown = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif name in ("bmm", "baddbmm"):
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        elif name == "convolution":
            x, w, out = args[0], args[1], func(*args, **kwargs)
            groups = args[8]
            self.flops += 2 * out.numel() * (x.shape[1] // groups) * w[0].numel() // w.shape[1]
            return out
        elif any(s in name for s in self.SUSPECT):
            self.unknown.add(name)
        return func(*args, **kwargs)


def counted_flops(fn) -> int:
    with MatmulFlops() as counter:
        fn()
    assert not counter.unknown, f"matrix products this count cannot see: {counter.unknown}"
    return counter.flops


def test_matmul_counter_counts_what_it_should():
    a, b = torch.randn(3, 4, 5), torch.randn(5, 6)
    assert counted_flops(lambda: a @ b) == 2 * 3 * 4 * 5 * 6
    assert counted_flops(lambda: torch.nn.functional.linear(a, torch.randn(6, 5), torch.randn(6))) \
        == 2 * 3 * 4 * 5 * 6
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    assert counted_flops(lambda: conv(torch.randn(2, 3, 16, 16))) == 2 * (2 * 8 * 4 * 4) * 3 * 4 * 4
    with pytest.raises(AssertionError, match="cannot see"):
        counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(a, a, a))


def test_arm_flops_match_the_executed_matmuls():
    # every matmul of the module, forward and a training step, on the reference backend
    for case in make_cases(["arm"], "tiny"):
        fn = workloads.build(case, "cpu").fn("reference")
        assert counted_flops(fn) == case.flops, case.mode


def test_baseline_attention_flops_match_the_executed_matmuls():
    # the reference backend writes each baseline attention out as matmuls
    cases = make_cases(BASELINE_OPS, "tiny")
    assert {c.op for c in cases} == set(BASELINE_OPS) and all(c.mode == "forward" for c in cases)
    for case in cases:
        fn = workloads.build(case, "cpu").fn("reference")
        executed = counted_flops(fn)
        if case.op == "masked_affinity_attention":  # the count takes each S_ij = S_ji once
            s = case.shape
            executed -= s["B"] * (s["n"] - 1) * s["n"] * s["C"]
        assert executed == case.flops, case.op


def test_proxyclip_counts_its_affinities_once_per_image():
    """The affinities S (C wide) serve every head: a count that took them per head would put
    the cpu kernel at several times the matmul ceiling (it once read 466%)."""
    def flops(B=2, n=784, C=768, H=12, d=64):
        return Case("masked_affinity_attention", "forward",
                    (("B", B), ("n", n), ("C", C), ("H", H), ("d", d))).flops
    n, C, d = 784, 768, 64
    per_head = 2 * n * n * d
    assert flops(H=12) - flops(H=1) == 2 * 11 * per_head  # only P V grows with the heads
    assert flops(B=2) == 2 * flops(B=1)
    assert flops() == 2 * (n * (n + 1) * C + 12 * per_head)  # S's distinct entries, once
    # percent of the matmul ceiling, from a result at exactly the ceiling's rate for that work
    ceiling_tflops = 0.2
    case = Case("masked_affinity_attention", "forward",
                (("B", 16), ("n", n), ("C", C), ("H", 12), ("d", d)))
    at_ceiling = Result(case, "cpu", "cpu", timer.Timing((case.flops / (ceiling_tflops * 1e12),), 1))
    row = report.rows([at_ceiling.to_dict()], {"matmul_tflops": ceiling_tflops})[0]
    assert row["% mm peak"] == "100.0%"


def test_ceilings_are_the_best_of_their_measurements():
    from armfast.bench.ceilings import Ceilings
    low = Ceilings(matmul_tflops=0.09, copy_gbps=30.0, matmul_n=3072, copy_bytes=1, dtype="float32")
    high = Ceilings(matmul_tflops=0.2, copy_gbps=20.0, matmul_n=3072, copy_bytes=1, dtype="float32")
    best = low.best(high)
    assert (best.matmul_tflops, best.copy_gbps) == (0.2, 30.0)


def test_baseline_attention_cases_cover_the_crops():
    full = make_cases(BASELINE_OPS, "full")
    sclip = {(c.shape["B"], c.shape["N"]) for c in full if c.op == "self_correlation_sum"}
    assert sclip == {(B, N) for B in (1, 16) for N in (197, 442, 785)}
    naclip = [c.shape for c in full if c.op == "gaussian_self_correlation"]
    assert all(s["h"] * s["w"] + 1 == s["N"] for s in naclip)
    proxy = {(c.shape["B"], c.shape["n"]) for c in full if c.op == "masked_affinity_attention"}
    assert proxy == {(B, n) for B in (1, 16) for n in (784, 1764, 3136)}  # the DINO /8 grid
    with pytest.raises(ValueError, match="inference only"):
        Case("self_correlation", "train", ())


def test_baseline_attention_workloads_check_every_backend():
    for case in make_cases(BASELINE_OPS, "tiny"):
        workload = workloads.build(case, "cpu")
        for backend in ("sdpa", "cpu"):
            assert workload.check(backend) < 1e-5, (case.op, backend)


@pytest.mark.slow
def test_clip_flops_match_the_executed_matmuls():
    pytest.importorskip("open_clip")
    try:
        workloads.clip_module()
    except workloads.Unavailable as exc:
        pytest.skip(str(exc))
    for case in make_cases(["clip"], "tiny"):
        fn = workloads.build(case, "cpu").fn("reference")
        flops = counted_flops(fn)
        workloads.clear_caches()
        assert flops == case.flops, case.variant


# ---- workloads: outputs are checked against the reference --------------------------------

def test_relative_error():
    a = torch.tensor([1.0, 2.0, 4.0])
    assert workloads.relative_error([a], [a]) == 0
    assert workloads.relative_error([a + 0.04], [a]) == pytest.approx(0.01)
    assert workloads.relative_error([a * float("nan")], [a]) == math.inf


def test_check_rejects_wrong_outputs():
    case = make_cases(["attention"], "tiny", modes=["forward"])[0]
    work = workloads.build(case, "cpu")
    assert work.check("sdpa") < workloads.TOLERANCE[torch.float32]

    class Broken(workloads.AttentionWorkload):
        def outputs(self, backend):
            out = super().outputs(backend)
            return out if backend == "reference" else tuple(o + 1 for o in out)

    with pytest.raises(workloads.CheckFailed, match="exceeds"):
        Broken(case, torch.device("cpu")).check("sdpa")


def test_train_workloads_give_gradients():
    for case in make_cases(["attention", "patch_text_logits", "arm"], "tiny", modes=["train"]):
        work = workloads.build(case, "cpu")
        outputs = work.outputs("reference")
        assert len(outputs) >= 2 and all(torch.isfinite(o).all() for o in outputs)
        assert any(o.abs().sum() > 0 for o in outputs[1:]), case.op  # gradients are not all 0
        assert work.check("sdpa") >= 0


# ---- timer and memory ---------------------------------------------------------------------

def test_timer_plan_and_measure():
    calls = []
    config = timer.TimerConfig(min_round_s=0.0, rounds=4, max_total_s=10.0, warmup=2)
    timing = timer.measure(lambda: calls.append(1), "cpu", config)
    assert timing.rounds == 4 and timing.calls == 1 and timing.median_s > 0
    assert len(calls) == 2 + 3 + 1  # warm-up, three calibration calls reused as rounds, one more
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        timer.TimerConfig(min_round_s=0.0, rounds=0, max_total_s=1.0)


def test_peak_memory_sees_torch_allocations_on_cpu():
    nbytes = 4 << 20
    peak = memory.peak_memory(lambda: torch.empty(nbytes, dtype=torch.uint8), "cpu")
    if peak is None:
        pytest.skip("this torch's profiler records no CPU memory events")
    assert nbytes <= peak < 2 * nbytes


# ---- tables ----------------------------------------------------------------------------------

def test_formatting_helpers():
    assert report.format_time(None) == "-"
    assert report.format_time(1.5) == "1.5 s"
    assert report.format_time(0.0123) == "12.3 ms"
    assert report.format_time(4.56e-6) == "4.56 us"
    assert report.format_bytes(512) == "512 B"
    assert report.format_bytes(3 << 20) == "3 MiB"
    assert report.format_bytes(5 << 30) == "5 GiB"
    assert report.format_bytes(1023 << 10) == "1023 KiB"
    assert report.format_time(1234.0) == "1234 s"
    assert report.format_ratio(2.0) == "2.00x"


def _result(case, backend, seconds, **kw):
    return Result(case, "cpu", backend, timing=timer.Timing((seconds,), 1), **kw)


def test_table_rows_speedups_and_notes():
    case = make_cases(["attention"], "tiny", modes=["forward"])[0]
    results = [_result(case, "reference", 4e-3, peak_bytes=1 << 20, max_error=0.0),
               _result(case, "sdpa", 2e-3, peak_bytes=1 << 10, max_error=1e-7),
               _result(case, "cpu", 1e-3, max_error=2e-7),
               Result(case, "cpu", "triton", skipped="no GPU"),
               Result(case, "cpu", "cuda", error="wrong numbers")]
    data = report.to_json(results, {"device": "cpu"}, None, "armfast bench")
    table = report.rows(data["results"])
    assert [r["vs ref"] for r in table] == ["1.00x", "2.00x", "4.00x", "-", "-"]
    assert [r["vs sdpa"] for r in table] == ["0.50x", "1.00x", "2.00x", "-", "-"]
    assert table[0]["peak mem"] == "1 MiB" and table[2]["peak mem"] == "-"
    assert table[3]["note"] == "skipped: no GPU" and table[4]["note"] == "FAILED: wrong numbers"
    text = report.format_table(table)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["op", "mode", "shape", "backend"]
    assert len(lines) == 2 + len(results) and set(lines[1]) == {"-"}
    md = report.format_markdown(table)
    assert md.splitlines()[1].startswith("| --- |") and md.count("\n") == 1 + len(results)
    ceilings = {"matmul_tflops": 1.0, "copy_gbps": 10.0}
    with_ceilings = report.rows(data["results"], ceilings)
    assert with_ceilings[0]["% mm peak"].endswith("%")


# ---- `armfast bench` --------------------------------------------------------------------------

def _table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    return [line.split() for line in lines[start + 2:] if line.strip()]


def test_bench_command_smoke(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    # reference and sdpa only: the fused backends have their own tests, and this one must not
    # depend on them
    assert main(["bench", "--quick", "--shapes", "tiny", "--device", "cpu", "--ops", "attention",
                 "--backends", "reference,sdpa", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    backends = {row[6] for row in rows}  # op mode B= H= N= d= backend
    assert {"reference", "sdpa"} <= backends, out
    for row in rows:  # the two speed-up cells: "1.00x" style, after "median" (2 cells), "runs"
        assert row[6] in ("reference", "sdpa"), out
        assert all(re.fullmatch(r"\d+\.\d\dx", cell) for cell in row[10:12]), out
    data = json.loads(out_json.read_text())
    assert data["command"].startswith("armfast bench --quick --shapes tiny --device cpu")
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["date"]
    assert data["ceilings"]["matmul_tflops"] > 0 and data["ceilings"]["copy_gbps"] > 0
    timed = [r for r in data["results"] if r["median_s"] is not None]
    assert {r["backend"] for r in timed} >= {"reference", "sdpa"}
    for r in timed:
        assert r["speedup_vs_reference"] > 0 and r["speedup_vs_sdpa"] > 0 and r["tflops"] > 0
        assert r["max_error"] <= workloads.TOLERANCE[torch.float32]


def test_bench_shapes_from_environment(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ARMFAST_BENCH_SHAPES", "tiny")
    markdown = tmp_path / "cpu.md"
    assert main(["bench", "--quick", "--ops", "patch_text_logits", "--modes", "forward",
                 "--backends", "sdpa", "--no-ceilings", "--device", "cpu",
                 "--markdown", str(markdown)]) == 0
    assert "B=1 N=17 C=5 E=32" in capsys.readouterr().out
    section = markdown.read_text()
    assert section.startswith("## CPU") and "| patch_text_logits | forward |" in section


def test_bench_rejects_bad_lists(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--ops", "attention,conv"])
    assert "expected a comma-separated list" in capsys.readouterr().err


def test_runner_reports_unavailable_backends():
    case = make_cases(["attention"], "tiny", modes=["forward"])[0]
    assert select_backends("cpu", ["sdpa"]) == ["reference", "sdpa"]
    results = run([case], "cpu", backends=["cuda"], config=timer.QUICK, memory=False)
    cuda = next(r for r in results if r.backend == "cuda")
    assert cuda.median_s is None and (cuda.skipped or cuda.error)


@pytest.mark.slow
def test_benchmark_suite_runs_every_case_once(tmp_path):
    # the pytest-benchmark suites collect and run with --benchmark-disable (tiny shapes here)
    env = dict(os.environ, ARMFAST_BENCH_SHAPES="tiny", ARMFAST_BENCH_DEVICE="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-disable", "-q",
         "-p", "no:cacheprovider", "-k", "attention or patch_text_logits"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
