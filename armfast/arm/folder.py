"""An ARM on disk: the folder ``ARM.save_pretrained`` writes and ``ARM.from_pretrained`` reads.

    model.safetensors   the weights (written atomically; mode follows the umask)
    config.json         the `ARMConfig`
    README.md           what the folder is, how to load it, its config

Loading refuses, with the file named, anything that cannot be trusted before a single image
is processed: no or unreadable config, a damaged or truncated safetensors file, missing,
unexpected or mis-shaped tensors, non-finite weights. Nothing here goes through Hugging Face's
loader, which prints to stdout and fills missing tensors with random ones.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .._files import atomic_write_bytes, atomic_write_text
from .._version import __version__
from .config import ARMConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"


def model_card(arm, where: str = "PATH", training: dict | None = None) -> str:
    """The README of an ARM folder: what it is, how to load it, its config."""
    c = arm.config
    n_params = sum(p.numel() for p in arm.parameters())
    tau = float(arm.logit_scale.detach().exp())
    lines = [
        "---",
        "library_name: armfast",
        "tags:",
        "- open-vocabulary-segmentation",
        "- clip",
        "- arm",
        "---",
        "",
        f"# Attention Refinement Module (ARM) for CLIP {c.backbone}",
        "",
        f"An ARM written by armfast {__version__}: a {n_params / 1e6:.2f} M-parameter module that "
        f"fuses the CLIP's shallow layers {tuple(c.shallow_layers)} and refines a training-free "
        f"baseline's deep patch features (SCLIP, ClearCLIP, NACLIP, MaskCLIP, ProxyCLIP) for "
        f"open-vocabulary semantic segmentation. Use it with the CLIP it was built for, "
        f"{c.backbone} (width {c.width}, embedding dim {c.embed_dim}). Learnt softmax "
        f"temperature tau = {tau:.2f}.",
        "",
    ]
    if training:
        lines += ["## Training", ""]
        lines += [f"- {k}: {v}" for k, v in training.items()]
        lines.append("")
    lines += [
        "## Load it",
        "",
        "```python",
        "import armfast",
        f'arm = armfast.ARM.from_pretrained("{where}")',
        f'result = armfast.segment("photo.jpg", ["cat", "grass", "sky"], baseline="sclip", '
        f'arm="{where}")',
        "```",
        "",
        "```bash",
        f"armfast segment photo.jpg --classes cat,grass,sky --baseline sclip --arm {where} -o out/",
        f"armfast eval --dataset voc21 --root data --baseline sclip --pretrained openai --arm {where}",
        "```",
        "",
        "## Files",
        "",
        f"- `{WEIGHTS}`: the weights (safetensors);",
        f"- `{CONFIG}`: the `armfast.ARMConfig` below;",
        f"- `{CARD}`: this file.",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(c.to_dict(), indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def save_folder(arm, directory: str | os.PathLike, *, training: dict | None = None) -> Path:
    """Write `arm` to `directory` (weights, config, README); returns the folder."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in arm.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS, save(state, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG, json.dumps(arm.config.to_dict(), indent=2,
                                                     sort_keys=True) + "\n")
    atomic_write_text(directory / CARD, model_card(arm, str(directory), training))
    return directory


def _read_config(directory: Path) -> ARMConfig:
    path = directory / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not an ARM folder "
                                f"(ARM.save_pretrained writes {WEIGHTS} and {CONFIG}; training "
                                f"writes it to OUT/arm)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of ARMConfig fields, got "
                         f"{type(values).__name__}")
    try:
        return ARMConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a valid ARMConfig: {exc}") from exc


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; ValueError naming it when damaged or truncated."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the ARM's weights)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"{path} is damaged or truncated and cannot be read ({reason}); save "
                         f"or copy the ARM again") from exc


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                source: str) -> None:
    """Same tensor names and shapes as `expected`, floating point, every value finite;
    ValueError naming `source` otherwise."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}"
                         f"{', ...' if len(unexpected) > 4 else ''})")
        raise ValueError(f"{source} does not hold this ARM's weights: {'; '.join(parts)}")
    for name, ref in expected.items():
        t = state[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the "
                             f"config gives {tuple(ref.shape)} (weights and config.json of "
                             f"different ARMs?)")
        if not t.is_floating_point():
            raise ValueError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN or "
                             f"inf); the ARM is unusable (a diverged training run?)")


def read_folder(directory: str | os.PathLike) -> tuple[ARMConfig, dict[str, torch.Tensor], str]:
    """``(config, weights, weights path)`` of the ARM folder `directory`, each file checked
    (module docstring); `check_state` against the module built from the config does the rest."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no ARM folder at {directory}")
    config = _read_config(directory)
    path = directory / WEIGHTS
    return config, read_weights(path), str(path)
