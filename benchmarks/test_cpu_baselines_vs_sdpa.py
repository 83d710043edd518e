"""benchmarks/cpu_baselines_vs_sdpa.py (issue 23's CPU table) end to end: every backend checked
against the reference, timed interleaved, the table printed. With --benchmark-disable or
ARMFAST_BENCH_QUICK=1 at one small grid; otherwise at B = 1 and the issue's token counts."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from armfast import ops

pytestmark = pytest.mark.skipif(ops.backend_status("cpu")["cpu"] is not None,
                                reason=f"cpu backend unavailable: {ops.backend_status('cpu')['cpu']}")


def _script():
    path = Path(__file__).with_name("cpu_baselines_vs_sdpa.py")
    spec = importlib.util.spec_from_file_location("cpu_baselines_vs_sdpa", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_baselines_vs_sdpa(request, capsys):
    quick = request.config.getoption("benchmark_disable", False) or os.environ.get(
        "ARMFAST_BENCH_QUICK", "").strip().lower() not in ("", "0", "false", "no")
    sides = ["7"] if quick else ["21", "28", "32"]
    args = ["--batches", "1", "--sides", *sides, "--repeats", "2" if quick else "5"]
    assert _script().main(args) == 0
    out = capsys.readouterr().out
    rows = out[out.index("x sdpa"):].splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["SCLIP", "ClearCLIP", "NACLIP"] * len(sides)
