"""Vision foundation models (VFMs) for ProxyCLIP: CLIP-normalised crops in, patch features out.

ProxyCLIP takes its attention from a self-supervised ViT (DINO ViT-B/8 in the paper) instead
of from CLIP. The VFM is the user's object; nothing is fetched at run time:

- a timm ViT (``timm.create_model(..., dynamic_img_size=True)`` so that any crop size works):
  ``forward_features`` gives the final, normalised tokens;
- a torch-hub DINO / DINOv2 ViT: ``get_intermediate_layers(x, n=1)`` gives the final,
  normalised tokens (what ProxyCLIP's released code uses for DINO);
- any callable returning ``[B, T, C]`` tokens or a ``[B, C, h, w]`` feature map
  (give ``patch_size`` when it has no ``patch_embed.patch_size``);
- a checkpoint path (safetensors preferred), built as a timm architecture (`load_vfm`).

Token outputs keep their last ``h * w`` tokens: the patch tokens follow the class and register
tokens in DINO, DINOv2 and timm alike.
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO/DINOv2 preprocessing
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_VFM_ARCH = "vit_base_patch8_224.dino"  # ProxyCLIP's DINO ViT-B/8, as timm names it


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


class VisionFoundationModel:
    """Wraps a VFM so that ``vfm(images)`` returns patch features ``[B, C, h, w]``.

    ``images`` are CLIP-normalised ``[B, 3, H, W]``; they are mapped back to [0, 1], resized
    down to a multiple of the VFM's patch size when needed, and normalised with ``mean``/``std``
    (ImageNet statistics by default, as DINO expects). The VFM runs frozen, in eval mode and
    without gradients.
    """

    def __init__(self, model: Callable, *, patch_size: int | Sequence[int] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if not callable(model):
            raise TypeError(f"vfm must be a callable model (e.g. a DINO ViT), got {type(model).__name__}")
        if patch_size is None:
            patch_size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
            if patch_size is None:
                raise ValueError(f"vfm: cannot read the patch size of {type(model).__name__} "
                                 f"(no patch_embed.patch_size); pass patch_size=")
        self.patch_size = _pair(patch_size)
        if min(self.patch_size) < 1:
            raise ValueError(f"vfm patch_size must be positive, got {self.patch_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"vfm mean and std must have 3 values, got {mean!r} and {std!r}")
        self.model = model
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if isinstance(model, nn.Module):
            model.eval()

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The VFM's patch grid for a crop of ``height x width`` pixels."""
        ph, pw = self.patch_size
        h, w = height // ph, width // pw
        if h < 1 or w < 1:
            raise ValueError(f"images of {height}x{width} pixels are smaller than the VFM's "
                             f"{ph}x{pw} patches")
        return h, w

    def prepare(self, images: Tensor, clip_mean: Sequence[float],
                clip_std: Sequence[float]) -> Tensor:
        """CLIP-normalised crops -> the VFM's input normalisation and a multiple of its patch."""
        dtype = torch.promote_types(images.dtype, torch.float32)  # half -> float32, float64 stays

        def stats(values):
            return images.new_tensor(values, dtype=dtype).view(1, 3, 1, 1)

        x = images.to(dtype) * stats(clip_std) + stats(clip_mean)  # back to [0, 1] pixels
        h, w = self.grid(*images.shape[-2:])
        size = (h * self.patch_size[0], w * self.patch_size[1])
        if size != tuple(images.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - stats(self.mean)) / stats(self.std)

    @torch.no_grad()
    def __call__(self, images: Tensor, *, clip_mean: Sequence[float],
                 clip_std: Sequence[float]) -> Tensor:
        x = self.prepare(images, clip_mean, clip_std)
        param = next(iter(self.model.parameters()), None) if isinstance(self.model, nn.Module) else None
        if param is not None:
            if param.device != x.device:
                self.model.to(x.device)
            x = x.to(param.dtype)
        h, w = self.grid(*images.shape[-2:])
        out = self._features(x)
        if out.dim() == 4:
            if tuple(out.shape[-2:]) != (h, w):
                raise ValueError(f"vfm returned a {tuple(out.shape[-2:])} feature map for a "
                                 f"{(h, w)} patch grid")
            return out
        if out.dim() != 3 or out.shape[1] < h * w:
            raise ValueError(f"vfm must return [B, T >= {h * w}, C] tokens or [B, C, {h}, {w}] "
                             f"features, got shape {tuple(out.shape)}")
        return out[:, -h * w:].transpose(1, 2).unflatten(-1, (h, w))

    def _features(self, x: Tensor) -> Tensor:
        m = self.model
        if type(m).__module__.startswith("timm.") and hasattr(m, "forward_features"):
            out = m.forward_features(x)  # final norm applied; timm's intermediates skip it
        elif hasattr(m, "get_intermediate_layers"):
            out = m.get_intermediate_layers(x, n=1)[0]  # DINO / DINOv2 hub models
        elif hasattr(m, "forward_features"):
            out = m.forward_features(x)
        else:
            out = m(x)
        if isinstance(out, dict):  # DINOv2's forward_features
            out = out.get("x_norm_patchtokens", out.get("x"))
        if not isinstance(out, Tensor):
            raise TypeError(f"vfm features must be a tensor, got {type(out).__name__}")
        return out


@lru_cache(maxsize=4)
def _load_cached(path: str, arch: str, mtime: float) -> VisionFoundationModel:
    try:
        import timm
    except ImportError as exc:
        raise ImportError("building a VFM from a checkpoint path needs timm (pip install timm); "
                          "or pass the model object itself") from exc
    model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    state = _read_state_dict(path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("head")]  # classifier heads are unused
    if missing or unexpected:
        raise ValueError(f"vfm checkpoint {path} does not match timm architecture {arch!r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return VisionFoundationModel(model.requires_grad_(False))


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    # older DINO releases are .pth; weights_only refuses pickled code
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_vfm(path: str | os.PathLike, arch: str = DEFAULT_VFM_ARCH) -> VisionFoundationModel:
    """A VFM from a local checkpoint, built as the timm architecture ``arch`` (DINO ViT-B/8 by
    default). Loaded once per (path, modification time)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vfm checkpoint not found: {p}")
    return _load_cached(str(p.resolve()), arch, p.stat().st_mtime)


def as_vfm(vfm) -> VisionFoundationModel:
    """A `VisionFoundationModel` from a wrapper, a model object or a checkpoint path."""
    if vfm is None:
        raise ValueError("baseline 'proxyclip' needs vfm= (a DINO-style ViT, a "
                         "VisionFoundationModel, or a checkpoint path)")
    if isinstance(vfm, VisionFoundationModel):
        return vfm
    if isinstance(vfm, (str, os.PathLike)):
        return load_vfm(vfm)
    return VisionFoundationModel(vfm)
