"""Images in, model pixels out: decoding any image a caller gives, resizing to the protocol's
short side (mmseg's ``Resize(scale=(2048, short_side), keep_ratio=True)``) and CLIP's mean/std.
`Preparer` is a plain picklable object, so DataLoader workers do this off the main process."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_LONG_SIDE = 2048


def to_image_tensor(image) -> Tensor:
    """A PIL image, an ``HxW[x3|x4]`` array, a ``[3, H, W]`` tensor (uint8, or floats in
    [0, 1]) or a path -> float32 ``[3, H, W]`` in [0, 1]. Files and PIL images reach the model
    as a viewer shows them (`armfast.data.images.to_rgb`)."""
    import numpy as np

    from PIL import Image

    from ..data.images import open_rgb, to_rgb

    if isinstance(image, (str, os.PathLike)):
        image = open_rgb(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image: as a viewer shows it
        image = np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None].repeat(3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
        if image.shape[-1] == 4:  # RGBA: composited as for an RGBA file or PIL image
            if image.dtype != np.uint8:
                raise TypeError(f"an RGBA image array must be uint8, got {image.dtype}")
            image = np.asarray(to_rgb(Image.fromarray(image, mode="RGBA")))
        image = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a PIL image, a numpy array, a tensor or a path, got "
                        f"{type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3 or 0 in image.shape:
        raise ValueError(f"image tensor must be [3, H, W], got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise TypeError(f"image tensor must be uint8 or floating point, got {image.dtype}")
    return image.float()


@dataclass
class Prepared:
    """An image ready for the windows: CLIP-normalised pixels at the protocol's size, the size
    to return results at, and whatever the caller attaches (``meta``: a mask, a file name)."""

    pixels: Tensor  # [1, 3, h, w] float32
    size: tuple[int, int]  # (H, W) of the input image
    meta: Any = field(default=None, compare=False)

    def pin_memory(self) -> "Prepared":  # DataLoader(pin_memory=True) calls this in its thread
        meta = self.meta.pin_memory() if isinstance(self.meta, Tensor) else self.meta
        return Prepared(self.pixels.pin_memory(), self.size, meta)


def resize_scale(height: int, width: int, short_side: Optional[int]) -> float:
    """mmseg's ``Resize(scale=(2048, short_side), keep_ratio=True)``: the factor that takes the
    short side to ``short_side`` with the long side at most 2048 (None: 1)."""
    if short_side is None:
        return 1.0
    return min(short_side / min(height, width), MAX_LONG_SIDE / max(height, width))


def resized_size(height: int, width: int, short_side: Optional[int]) -> tuple[int, int]:
    """The image size after `resize_scale`."""
    scale = resize_scale(height, width, short_side)
    if scale == 1.0:
        return height, width
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


@dataclass(frozen=True)
class Preparer:
    """``preparer(image) -> Prepared``: an image (see `to_image_tensor`) resized to the short
    side (bilinear, antialiased when shrinking) and CLIP-normalised. A plain picklable object,
    so that DataLoader workers decode and resize off the main process."""

    short_side: Optional[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image, device=None, meta=None) -> Prepared:
        if device is not None and isinstance(image, Tensor) and image.dtype == torch.uint8:
            image = image.to(device)  # copy the bytes, convert there (4x less to move)
        x = to_image_tensor(image)
        H, W = x.shape[-2:]
        x = x.to(device)[None] if device is not None else x[None]
        size = resized_size(H, W, self.short_side)
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                              antialias=resize_scale(H, W, self.short_side) < 1)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return Prepared((x - mean) / std, (int(H), int(W)), meta)
