"""The result of segmenting one image, and how it is written to disk.

``SegmentationResult.save(path)`` picks what to write from the file extension:

==================  ===========================================================================
extension           written
==================  ===========================================================================
``.png``            the label map as a palette PNG: pixel value = class index (16-bit greyscale
                    above 256 classes); opens as a colour image, reads back as indices
``.jpg``/``.jpeg``  the overlay: the photo under the colour map, with a legend of the classes
``.webp``/``.bmp``  present
``.npy``            the label map as an int64 array ``[H, W]``
==================  ===========================================================================

``save(path, kind="overlay")`` writes the overlay to a ``.png`` as well (what
``armfast segment`` does for ``<stem>_overlay.png``); ``kind="labels"`` refuses lossy formats,
which would change class indices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..background import Background

KINDS = ("labels", "overlay")
OVERLAY_SUFFIXES = (".jpg", ".jpeg", ".webp", ".bmp")
LABEL_SUFFIXES = (".png", ".npy")


@dataclass
class SegmentationResult:
    labels: Tensor  # [H, W] int64 class indices
    probs: Tensor  # [C, H, W] float32 per-class probabilities (max over each class's synonyms)
    class_names: list[str]
    palette: np.ndarray  # [C, 3] uint8 colour of each class (overlay and palette PNG)
    background: Background = field(default_factory=Background)
    image: Optional[Tensor] = None  # [3, H, W] uint8 input, for overlays
    config: dict = field(default_factory=dict)  # the segmentor's effective configuration

    def __post_init__(self):
        if self.labels.dim() != 2:
            raise ValueError(f"labels must be [H, W], got {tuple(self.labels.shape)}")
        if self.probs.shape != (len(self.class_names), *self.labels.shape):
            raise ValueError(f"probs must be [C, H, W] = [{len(self.class_names)}, "
                             f"{', '.join(map(str, self.labels.shape))}], got {tuple(self.probs.shape)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def mask(self, name: str) -> Tensor:
        """Boolean ``[H, W]`` mask of the pixels labelled `name`."""
        if name not in self.class_names:
            raise ValueError(f"name must be one of the classes {self.class_names}, got {name!r}")
        return self.labels == self.class_names.index(name)

    def areas(self) -> dict[str, float]:
        """Fraction of the image each class covers, largest first (absent classes left out)."""
        counts = torch.bincount(self.labels.flatten(), minlength=self.num_classes).double()
        frac = (counts / counts.sum()).tolist()
        order = sorted(range(self.num_classes), key=lambda i: -frac[i])
        return {self.class_names[i]: frac[i] for i in order if frac[i] > 0}

    @property
    def background_index(self) -> Optional[int]:
        """The background class, when the background rule gives one (else None)."""
        return self.background.index if self.background.enabled else None

    def label_image(self):
        """The label map as a PIL palette image (see the module docstring)."""
        from .visualize import label_image

        return label_image(self.labels.numpy(), self.num_classes, self.palette)

    def overlay(self):
        """The photo under the colour map with a legend (a PIL RGB image): see
        `armfast.inference.visualize.overlay`."""
        from PIL import Image

        from .visualize import overlay

        if self.image is None:
            raise ValueError("this result holds no image to overlay (image=None)")
        photo = Image.fromarray(self.image.permute(1, 2, 0).numpy())
        return overlay(photo, self.labels.numpy(), self.class_names, self.palette,
                       self.background_index)

    def save(self, path, kind: Optional[str] = None) -> Path:
        """Writes the labels or the overlay to `path` (see the module docstring for how the
        extension decides); returns the path."""
        path = Path(path)
        suffix = path.suffix.lower()
        if kind is None:
            if suffix in LABEL_SUFFIXES:
                kind = "labels"
            elif suffix in OVERLAY_SUFFIXES:
                kind = "overlay"
            else:
                raise ValueError(f"path: cannot tell what to write from the extension {suffix!r} of "
                                 f"{str(path)!r}; use .png or .npy (labels), .jpg/.jpeg/.webp/.bmp "
                                 f"(overlay), or pass kind='labels'|'overlay'")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)} or None, got {kind!r}")
        if kind == "labels" and suffix not in LABEL_SUFFIXES:
            raise ValueError(f"path: labels go to a lossless .png or a .npy, got {str(path)!r}")
        if kind == "overlay" and suffix == ".npy":
            raise ValueError(f"path: an overlay is an image, not a .npy array ({str(path)!r})")
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "labels" and suffix == ".npy":
            np.save(path, self.labels.numpy().astype(np.int64))
        elif kind == "labels":
            self.label_image().save(path)
        else:
            self.overlay().save(path)
        return path

    def __repr__(self) -> str:
        h, w = self.labels.shape
        top = ", ".join(f"{n} {f:.0%}" for n, f in list(self.areas().items())[:5])
        return f"SegmentationResult({h}x{w}, {self.num_classes} classes; {top})"
