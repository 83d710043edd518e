"""`load_arm`: an ARM from what a caller gives (an instance or a folder), errors naming the flag."""
from __future__ import annotations

import os
from pathlib import Path

from .module import ARM


def load_arm(arm, what: str = "arm"):
    """An `armfast.ARM` from an instance or a local folder written by ``save_pretrained`` (every
    file checked, see `armfast.arm.folder`); None stays None; errors name `what` (``--arm``)."""
    if arm is None or isinstance(arm, ARM):
        return arm
    if isinstance(arm, (str, os.PathLike)):
        path = Path(arm)
        if path.is_file():
            kind = ("a training checkpoint; the trained ARM is the folder OUT/arm"
                    if path.parent.name == "checkpoints" else "a file")
            raise ValueError(f"{what}: {path} is {kind}; give the ARM folder (model.safetensors "
                             f"and config.json, written by ARM.save_pretrained or armfast train)")
        if not path.is_dir():
            raise FileNotFoundError(f"{what}: no ARM folder at {str(path)!r}")
        try:
            return ARM.from_pretrained(str(path))
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"{what}: {exc}") from exc
    raise TypeError(f"{what} must be an ARM, a checkpoint directory or None, got "
                    f"{type(arm).__name__}")
