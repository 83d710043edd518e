"""Checks that run before anything slow (a CLIP load, a scan of the data, the first image), so
that a wrong flag fails in a second with its name, not minutes or hours in.

- `clip_geometry`: patch size, width, depth and output dim of an open_clip model, read from its
  config without building it (crop sizes and an ARM can be checked against it);
- `check_backend`: a backend name that exists and runs on the device;
- `resolve_device`: ``cuda``/``cpu``/None (CUDA when present), refusing CUDA where there is none;
- `check_arm_fits`: an ARM (its config) against a CLIP's geometry.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


@dataclass(frozen=True)
class ClipGeometry:
    name: str  # as given
    patch_size: int
    image_size: int
    width: int
    layers: int
    embed_dim: int

    @property
    def backbone(self):
        """The registered `BackboneSpec` of this geometry, None for others."""
        from .backbones import canonical_name, find_backbone, get_backbone

        if canonical_name(self.name) is not None:
            return get_backbone(self.name)
        return find_backbone(patch_size=self.patch_size, image_size=self.image_size,
                             width=self.width, layers=self.layers, embed_dim=self.embed_dim)

    @property
    def label(self) -> str:
        spec = self.backbone
        return spec.name if spec is not None else f"{self.name!r} (not a registered backbone)"


def _int(value) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        value = value[0] if len(set(value)) == 1 else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def clip_geometry(name: str, flag: str = "--model") -> Optional[ClipGeometry]:
    """The geometry of open_clip model `name` (a built-in config or ``local-dir:FOLDER``) from
    its config file; None where that is not known without a download (``hf-hub:``, timm
    towers). Unknown names and missing folders raise, naming `flag`."""
    import open_clip

    from .backbones import ALIASES

    name = ALIASES.get(name, name)
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]).expanduser() / "open_clip_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {name}: no open_clip_config.json in that folder "
                                    f"(a local-dir: model is a folder with open_clip_config.json "
                                    f"and its weights)")
        try:
            cfg = json.loads(path.read_text()).get("model_cfg", {})
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{flag} {name}: {path} is not an open_clip config ({exc})") from exc
    elif ":" in name:
        return None
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ValueError(f"{flag} must be an open_clip model such as ViT-B-16, ViT-B-32, "
                             f"ViT-L-14 (open_clip.list_models()), got {name!r}")
    vision = cfg.get("vision_cfg", {})
    values = dict(patch_size=_int(vision.get("patch_size")), image_size=_int(vision.get("image_size")),
                  width=_int(vision.get("width")), layers=_int(vision.get("layers")),
                  embed_dim=_int(cfg.get("embed_dim")))
    if vision.get("timm_model_name") or None in values.values():
        return None
    return ClipGeometry(name=name, **values)


def check_crop(crop: int, geometry: Optional[ClipGeometry], flag: str = "--crop") -> None:
    """Training crops must be whole patches (inference pads instead)."""
    if geometry is not None and crop % geometry.patch_size:
        raise ValueError(f"{flag} must be a multiple of the patch size {geometry.patch_size} of "
                         f"{geometry.label}, got {crop} (e.g. "
                         f"{max(1, round(crop / geometry.patch_size)) * geometry.patch_size})")


def check_arm_fits(arm_config, geometry: Optional[ClipGeometry], flag: str = "--arm") -> None:
    from .clip.model import arm_mismatch

    if geometry is None:
        return
    spec = geometry.backbone
    problem = arm_mismatch(arm_config, backbone=spec.name if spec else None, width=geometry.width,
                           embed_dim=geometry.embed_dim, depth=geometry.layers,
                           clip_label=geometry.label)
    if problem:
        raise ValueError(f"{flag}: {problem}")


def resolve_device(device: Optional[str], flag: str = "--device") -> torch.device:
    """``cuda``, ``cpu`` (or another torch device string), None: CUDA when present."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{flag} must be a torch device such as cpu or cuda, got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {device}: torch sees no CUDA device here (use --device cpu)")
    return dev


def check_backend(backend: str, device, flag: str = "--backend") -> None:
    """`backend` is ``auto`` or a backend that runs on `device`."""
    from .ops import BACKENDS, backend_status

    if backend == "auto":
        return
    if backend not in BACKENDS:
        raise ValueError(f"{flag} must be auto or one of {', '.join(BACKENDS)}, got {backend!r}")
    reason = backend_status(torch.device(device)).get(backend)
    if reason is not None:
        raise ValueError(f"{flag} {backend} does not run on {torch.device(device).type} here: "
                         f"{reason} (armfast backends lists what does)")
