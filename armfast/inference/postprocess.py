"""From an image's averaged window logits to what a caller asks for, as the baselines publish it:
logits resized to the image and scaled, a softmax over every query, each class's best query,
SCLIP's area rule, the argmax, and the background threshold (`armfast.background`)."""
from __future__ import annotations

from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor

from ..background import Background
from .queries import TextQueries


def scaled_logits(averaged: Tensor, size: tuple[int, int], scale: Union[float, Tensor]) -> Tensor:
    """Averaged cosine logits ``[S, h, w]`` -> ``scale`` times them at the image's ``size``."""
    logits = F.interpolate(averaged[None], size=tuple(size), mode="bilinear",
                           align_corners=False)[0]
    return logits * (scale.to(logits.dtype) if isinstance(scale, Tensor) else scale)


def class_probabilities(logits: Tensor, queries: TextQueries) -> Tensor:
    """``[S, H, W]`` scaled logits -> ``[C, H, W]``: softmax over every query (background words
    included), then each class's best query."""
    return queries.per_class_max(logits.softmax(0), dim=0)


def label_map(probs: Tensor, background: Background, area_thd: Optional[float] = None) -> Tensor:
    """``[H, W]`` int64 labels of per-class probabilities ``[C, H, W]``: with ``area_thd``
    (SCLIP's VOC21 rule) the classes other than the background covering less than that share
    of the pixels are dropped first; pixels whose best probability is under the background's
    ``prob_thd`` go to its class."""
    if area_thd is not None:
        pred = probs.argmax(0).flatten()
        # scatter_add, not bincount: bincount reads the maximum back to the host on a GPU
        area = probs.new_zeros(probs.shape[0]).scatter_add_(0, pred, probs.new_ones(pred.shape))
        area[background.index] = 0
        keep = area > area_thd * area.sum()
        keep[background.index] = True
        probs = probs * keep.to(probs.dtype).view(-1, 1, 1)
    best, pred = probs.max(0)
    return pred.masked_fill(best < background.prob_thd, background.index)
