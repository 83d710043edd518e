"""Training checkpoints: one safetensors file per checkpoint, written atomically.

Tensors (ARM weights, optimizer moments, RNG byte states) are safetensors tensors; everything
else (step, scheduler state, optimizer hyper-parameters, python/numpy RNG, the run's config) is
JSON in the safetensors metadata. No pickle is involved, so loading a checkpoint cannot run
code. A SHA-256 over all tensor bytes, stored in the metadata, catches corruption that leaves
the file structurally valid; a truncated or garbled file fails to parse. Either way the file is
refused with a ``ValueError`` naming it.

Layout of the tensor names:
    arm.<param>                 ARM state dict
    optim.<param index>.<key>   optimizer per-parameter state (exp_avg, exp_avg_sq, step, ...)
    rng.torch, rng.cuda.<i>     torch CPU / CUDA generator states
    rng.numpy.keys              numpy MT19937 key
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from .._files import atomic_write_bytes

FORMAT = "armfast-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.safetensors$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


# ---- RNG state ----------------------------------------------------------------------------
def capture_rng_state() -> tuple[dict[str, Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": _to_json(random.getstate())}
    return tensors, meta


def restore_rng_state(tensors: dict[str, Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy.keys"].numpy().astype(np.uint32), pos,
                         has_gauss, gauss))
    random.setstate(_from_json(meta["python"]))


def _to_json(obj):
    return [_to_json(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _from_json(obj):
    return tuple(_from_json(x) for x in obj) if isinstance(obj, list) else obj


# ---- optimizer state ----------------------------------------------------------------------
def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- integrity ----------------------------------------------------------------------------
def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- save / load --------------------------------------------------------------------------
def save_checkpoint(path: str | Path, *, step: int, arm: dict[str, Tensor], optimizer: dict,
                    scheduler: dict, rng: bool = True, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically. `arm`/`optimizer`/`scheduler` are state dicts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"arm.{k}": v.detach().cpu().contiguous() for k, v in arm.items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    meta = {"format": FORMAT, "version": VERSION, "step": int(step), "optimizer": opt_meta,
            "scheduler": scheduler, "extra": extra or {}}
    if rng:
        rng_tensors, meta["rng"] = capture_rng_state()
        tensors.update(rng_tensors)
    meta_json = json.dumps(meta, allow_nan=True)
    data = st_save(tensors, metadata={"armfast": meta_json, "sha256": _digest(tensors)})
    atomic_write_bytes(path, data)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read and verify a checkpoint -> {step, arm, optimizer, scheduler, rng, extra}.

    Raises FileNotFoundError if absent and ValueError if truncated, corrupt or not a checkpoint
    of this format, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is corrupt or truncated and cannot be read "
                         f"({exc}); delete it to resume from an earlier one") from exc
    if "armfast" not in metadata or "sha256" not in metadata:
        raise ValueError(f"checkpoint {path} is not an armfast training checkpoint "
                         f"(no armfast metadata)")
    try:
        meta = json.loads(metadata["armfast"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {path} has corrupt metadata ({exc})") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"checkpoint {path} has format {meta.get('format')!r} version "
                         f"{meta.get('version')!r}; expected {FORMAT!r} version {VERSION}")
    if _digest(tensors) != metadata["sha256"]:
        raise ValueError(f"checkpoint {path} is corrupt: its tensor data does not match the "
                         f"stored SHA-256; delete it to resume from an earlier one")
    arm = {k[len("arm."):]: v for k, v in tensors.items() if k.startswith("arm.")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return {
        "path": path,
        "step": meta["step"],
        "arm": arm,
        "optimizer": _unflatten_optimizer(optim, meta["optimizer"]),
        "scheduler": meta["scheduler"],
        "rng": (rng, meta["rng"]) if "rng" in meta else None,
        "extra": meta.get("extra", {}),
    }


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(directory)[:-keep]:
        p.unlink(missing_ok=True)
