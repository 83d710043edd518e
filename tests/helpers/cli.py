"""Running the command line in-process and reading what it told the user."""
from __future__ import annotations

import pytest


def run_cli(capsys, argv):
    """(exit status, stdout, stderr lines) of ``armfast ARGV``."""
    from armfast.cli import main

    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def one_error(capsys, argv, rc=2) -> str:
    """The single ``error:`` line of a failing command (exit status `rc`, no traceback)."""
    code, _, err = run_cli(capsys, argv)
    errors = [line for line in err if ": error: " in line]
    assert code == rc and len(errors) == 1, err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


def block_clip(monkeypatch) -> None:
    """Makes loading a CLIP fail loudly (an unexpected error, exit status 1): the checks
    under test must come before it."""
    import armfast.clip
    import armfast.clip.model

    def refuse(*args, **kwargs):
        raise AssertionError("CLIP was loaded before the check")

    monkeypatch.setattr(armfast.clip, "load_clip", refuse)
    monkeypatch.setattr(armfast.clip.model, "load_clip", refuse)


@pytest.fixture
def no_clip(monkeypatch):
    block_clip(monkeypatch)
