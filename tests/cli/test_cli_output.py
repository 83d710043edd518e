"""What a user reads is ours: no native library log lines, Hugging Face messages or Python
warning boilerplate between armfast's own lines; mistakes end in one line and a non-zero exit,
with the traceback behind --debug / ARMFAST_DEBUG."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers.cli import one_error


def _run(*args, cwd, env=None, timeout=300):
    """`armfast ARGS` in a fresh process, started in `cwd` (not a source checkout, whose
    uncompiled armfast/ folder ``-m`` would import); `env` values of None remove a variable."""
    env = {**os.environ, "ARMFAST_DEBUG": None, "KINETO_LOG_LEVEL": None, **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "armfast.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=cwd)


def test_bench_prints_only_its_own_lines(tmp_path):
    proc = _run("bench", "--shapes", "tiny", "--no-ceilings", "--ops", "attention,arm",
                "--modes", "forward", "--backends", "cpu", cwd=tmp_path,
                env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = re.compile(r"^(# |\[\d+/\d+\] )")
    foreign = [line for line in proc.stderr.splitlines() if not ours.match(line)]
    assert not foreign, foreign[:5]  # e.g. "USDT: ... profiler_start", "gpuGetDeviceCount failed"
    rows = [r for r in proc.stdout.splitlines() if r.startswith(("attention ", "arm "))]
    assert len(rows) >= 6 and all(re.search(r"\d (B|KiB|MiB|GiB) ", r) for r in rows), rows


def test_debug_flag_and_environment_show_the_traceback(tmp_path, capsys, monkeypatch):
    from armfast.cli import main

    argv = ["segment", str(tmp_path / "a.png"), "--classes", "cat", "-o", str(tmp_path / "out"),
            "--arm", str(tmp_path / "no-arm")]
    assert "--arm: no ARM folder" in one_error(capsys, argv)
    with pytest.raises(FileNotFoundError, match="--arm: no ARM folder"):  # the traceback
        main([*argv, "--debug"])
    monkeypatch.setenv("ARMFAST_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="--arm: no ARM folder"):
        main(argv)


def test_random_weights_log_nothing(caplog):
    """open_clip logs "Model initialized randomly" on the root logger (a foreign line in every
    command) when random weights are what was asked for."""
    from armfast.clip import load_clip
    from helpers.clip_models import register_tiny

    with caplog.at_level("INFO"):
        load_clip(register_tiny(), pretrained=None)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_an_unexpected_error_is_one_line_that_asks_for_a_report(capsys, monkeypatch):
    import armfast.cli.backends

    def boom(args):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(armfast.cli.backends, "run", boom)
    line = one_error(capsys, ["backends"], rc=1)
    assert "RuntimeError: kaboom second line" in line and "--debug" in line


def test_warnings_are_one_line_each(capsys, monkeypatch):
    import warnings

    import armfast.cli.backends

    def warn(args):
        warnings.warn("first\nsecond", UserWarning)
        return 0

    monkeypatch.setattr(armfast.cli.backends, "run", warn)
    from armfast.cli import main

    assert main(["backends"]) == 0
    assert capsys.readouterr().err.splitlines() == ["armfast backends: warning: first second"]
