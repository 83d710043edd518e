"""Resuming a run: the checkpoint to continue from, checked against the settings it fixes, and
the run's log cut back to that checkpoint's step."""
from __future__ import annotations

import json
from pathlib import Path

from .._files import atomic_write_text
from .checkpoint import latest_checkpoint, load_checkpoint
from .config import RESUME_KEYS, TrainConfig, flag

LOG = "log.jsonl"  # OUT/log.jsonl: one JSON record per logged step


def read_resume(cfg: TrainConfig, ckpt_dir: Path, is_main: bool) -> tuple[Path, dict] | None:
    """``(path, checkpoint)`` of ``cfg.resume`` (``"latest"``: the newest in `ckpt_dir`, None
    when there is none), verified, with the settings it fixes compared to `cfg`'s."""
    path = Path(cfg.resume)
    if cfg.resume == "latest":
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            if is_main:
                print(f"armfast train: no checkpoint in {ckpt_dir}; starting from step 0")
            return None
    ckpt = load_checkpoint(path)
    saved = ckpt["extra"].get("config", {})
    current = cfg.to_dict()
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != current[k]]
    if changed:
        diffs = ", ".join(f"{flag(k)} {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ValueError(f"cannot resume from {path}: the run changed {diffs}; these fix the "
                         f"data order and schedule (start a new --out to change them)")
    return path, ckpt


def truncate_log(log: Path, step: int) -> None:
    """Drop log records past `step` (written after the checkpoint, before a kill) and a torn
    last line: the resumed run writes those steps again."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(log, "".join(f"{line}\n" for line in keep))
