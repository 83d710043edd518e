"""Image/mask transforms: CLIP normalisation and the training augmentation.

The augmentation takes its randomness from a ``numpy.random.Generator`` passed per sample, so
the same (seed, step) gives the same crop in any worker process and after a resume.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import IGNORE_INDEX

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(image: Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """uint8 [..., 3, H, W] (0..255) -> float32 normalised with `mean`/`std` (0..1 units)."""
    if image.dtype != torch.uint8:
        raise TypeError(f"image must be uint8 (0..255), got {image.dtype}")
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(f"image must be [..., 3, H, W], got {tuple(image.shape)}")
    m = torch.tensor(mean, dtype=torch.float32, device=image.device).view(3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32, device=image.device).view(3, 1, 1) * 255
    return (image.float() - m) / s


def resize_pair(image: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Bilinear (antialiased) image, nearest mask; image float [3, H, W], mask int64 [H, W]."""
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                          antialias=True)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


class TrainAugment:
    """Random scale, random crop (padding with mean colour / ignore) and horizontal flip.

    The image is first resized so that its short side is ``base_short * s`` with
    ``s ~ U(scale_range)``, then a ``crop x crop`` window is taken at a random offset.
    Returns (float32 normalised [3, crop, crop], int64 [crop, crop]); `mean`/`std` are the
    model's image statistics (CLIP's by default).
    """

    def __init__(self, crop: int = 224, base_short: int = 336,
                 scale_range: tuple[float, float] = (0.5, 2.0), flip_prob: float = 0.5,
                 mean=CLIP_MEAN, std=CLIP_STD):
        if crop < 1 or base_short < 1:
            raise ValueError(f"crop and base_short must be positive, got {crop}, {base_short}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.crop, self.base_short = crop, base_short
        self.scale_range, self.flip_prob = (float(lo), float(hi)), flip_prob
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Tensor, mask: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        h, w = mask.shape
        short = self.base_short * rng.uniform(*self.scale_range)
        f = short / min(h, w)
        size = (max(1, math.floor(h * f + 0.5)), max(1, math.floor(w * f + 0.5)))
        img, msk = resize_pair(normalize(image, self.mean, self.std), mask, size)

        c = self.crop
        ph, pw = max(c - size[0], 0), max(c - size[1], 0)
        if ph or pw:  # zero is the mean colour after normalisation
            img = F.pad(img, (0, pw, 0, ph), value=0.0)
            msk = F.pad(msk, (0, pw, 0, ph), value=IGNORE_INDEX)
        y = int(rng.integers(0, img.shape[1] - c + 1))
        x = int(rng.integers(0, img.shape[2] - c + 1))
        img, msk = img[:, y:y + c, x:x + c], msk[y:y + c, x:x + c]
        if rng.random() < self.flip_prob:
            img, msk = img.flip(-1), msk.flip(-1)
        return img.contiguous(), msk.contiguous()
