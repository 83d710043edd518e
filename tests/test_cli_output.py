"""What a user reads is ours: no native library log lines, Hugging Face messages or Python
warning boilerplate between armfast's own lines; mistakes end in one line and a non-zero exit,
with the traceback behind --debug / ARMFAST_DEBUG."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from armfast.cli import main


def _run(*args, env=None, timeout=300):
    """`armfast ARGS` in a fresh process; `env` values of None remove a variable."""
    env = {**os.environ, "ARMFAST_DEBUG": None, "KINETO_LOG_LEVEL": None, **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "armfast.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_bench_prints_only_its_own_lines():
    proc = _run("bench", "--shapes", "tiny", "--no-ceilings", "--ops", "attention,arm",
                "--modes", "forward", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = re.compile(r"^(# |\[\d+/\d+\] )")
    foreign = [line for line in proc.stderr.splitlines() if not ours.match(line)]
    assert not foreign, foreign[:5]  # e.g. "USDT: ... profiler_start", "gpuGetDeviceCount failed"
    rows = [r for r in proc.stdout.splitlines() if r.startswith(("attention ", "arm "))]
    assert len(rows) >= 3 and all(re.search(r"\d (B|KiB|MiB|GiB) ", r) for r in rows), rows
