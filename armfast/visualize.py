"""Label maps as images: palette PNGs and colour overlays with a legend (Pillow)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OVERLAY_ALPHA = 0.5  # weight of the colour map over the photo
SWATCH = 14  # legend swatch size, pixels
ROW = 18  # legend row height, pixels
PAD = 6


def palette(n: int) -> np.ndarray:
    """``[n, 3]`` uint8 colours, the PASCAL VOC colour map (bits of the index spread over RGB);
    class 0 is black, neighbouring indices get distinct colours."""
    idx = np.arange(n, dtype=np.int64)
    colors = np.zeros((n, 3), dtype=np.int64)
    c = idx.copy()
    for shift in range(7, -1, -1):
        for ch in range(3):
            colors[:, ch] |= ((c >> ch) & 1) << shift
        c >>= 3
    return colors.astype(np.uint8)


def label_image(labels: np.ndarray, num_classes: int) -> Image.Image:
    """A label map as a palette PNG image (16-bit greyscale above 256 classes, where a palette
    cannot index every class)."""
    labels = np.asarray(labels)
    if num_classes <= 256:
        im = Image.fromarray(labels.astype(np.uint8), mode="P")
        im.putpalette(palette(256).flatten().tolist())
        return im
    return Image.fromarray(labels.astype(np.uint16))


def overlay(image: Image.Image, labels: np.ndarray, class_names: Sequence[str]) -> Image.Image:
    """The photo blended with the colour map, and a legend of the classes present (largest
    area first) to its right."""
    labels = np.asarray(labels)
    colors = palette(len(class_names))
    photo = image.convert("RGB")
    blend = Image.blend(photo, Image.fromarray(colors[labels]), OVERLAY_ALPHA)

    counts = np.bincount(labels.flatten(), minlength=len(class_names))
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    font = ImageFont.load_default()
    draw_probe = ImageDraw.Draw(blend)
    text_w = max((draw_probe.textlength(class_names[i], font=font) for i in present), default=0)
    legend_w = int(PAD * 3 + SWATCH + text_w)
    height = max(blend.height, PAD * 2 + ROW * len(present))
    canvas = Image.new("RGB", (blend.width + legend_w, height), "white")
    canvas.paste(blend, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, i in enumerate(present):
        x, y = blend.width + PAD, PAD + row * ROW
        draw.rectangle([x, y, x + SWATCH, y + SWATCH], fill=tuple(int(v) for v in colors[i]),
                       outline="black")
        draw.text((x + SWATCH + PAD, y), class_names[i], fill="black", font=font)
    return canvas
