"""benchmarks/gpu_check.sh, the one command a lent GPU runs: its steps, their order and limits
fit the device's time, and `--only` takes known steps and refuses others. (Its dry mode,
ARMFAST_GPU_CHECK_DRY=1, runs every step on the CPU; that takes minutes and is not run here.)"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
BUDGET = 480  # seconds: the device tool allows 600 per command, and a rerun must fit the session

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def _default_steps() -> list[tuple[str, int]]:
    text = SCRIPT.read_text()
    steps = re.search(r"^STEPS=\((.*)\)$", text, flags=re.M).group(1).split()
    return [(s.split(":")[0], int(s.split(":")[1])) for s in steps]


def test_list_names_every_step_with_its_limit():
    done = _run("--list")
    assert done.returncode == 0, done.stderr
    listed = [line.split() for line in done.stdout.splitlines()]
    assert [name for name, _ in listed][:3] == ["build", "tests", "bench"]  # in order of value
    assert all(limit.endswith("s") and int(limit[:-1]) > 0 for _, limit in listed)


def test_the_budget_fits_the_device():
    text = SCRIPT.read_text()
    assert re.search(r"BUDGET=\$\{ARMFAST_GPU_CHECK_BUDGET:-(\d+)\}", text).group(1) == str(BUDGET)
    assert all(limit <= BUDGET for _, limit in _default_steps())


@pytest.mark.parametrize("args,message", [(("--only", "bench,nope"), "unknown step 'nope'"),
                                          (("--frobnicate",), "usage")])
def test_bad_arguments_are_refused_before_anything_runs(args, message, tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists()  # refused before it made or ran anything
