"""Label maps as images: palette PNGs and colour overlays with a legend (Pillow).

Colours: the PASCAL VOC colour map, without its black for the classes you name (black on a
photo only darkens it); a background class, when there is one, keeps VOC's black in the PNG and
is left untinted in the overlay. In the overlay every class region is the photo blended with
its colour and outlined in the pure colour; its legend swatch shows the region's average
blended colour inside a pure-colour border, so swatch and region look alike. Legend text and
swatches scale with the image, so the legend stays readable on a 6000 x 4000 photo viewed at
screen size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OVERLAY_ALPHA = 0.5  # weight of the colour over the photo
MIN_FONT = 12  # legend text height in pixels, at least
FONT_PER_HEIGHT = 1 / 36  # legend text height per image height


def voc_colors(indices: np.ndarray) -> np.ndarray:
    """PASCAL VOC colour map entries (bits of the index spread over RGB): 0 is black and
    neighbouring indices get distinct colours."""
    c = np.asarray(indices, dtype=np.int64).copy()
    colors = np.zeros((len(c), 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for ch in range(3):
            colors[:, ch] |= ((c >> ch) & 1) << shift
        c >>= 3
    return colors.astype(np.uint8)


def palette(n: int, background_index: Optional[int] = None) -> np.ndarray:
    """``[n, 3]`` uint8 class colours. Without a background class, class i gets VOC colour
    i + 1 (none is black); with background class 0, VOC's own colours (0 black); another
    background index is black and the rest as without one."""
    if background_index == 0:
        return voc_colors(np.arange(n))
    colors = voc_colors(np.arange(n) + 1)
    if background_index is not None and 0 <= background_index < n:
        colors[background_index] = 0
    return colors


def label_image(labels: np.ndarray, num_classes: int, colors: Optional[np.ndarray] = None
                ) -> Image.Image:
    """A label map as a palette PNG image (16-bit greyscale above 256 classes, where a palette
    cannot index every class); `colors` default to `palette(num_classes)`."""
    labels = np.asarray(labels)
    if num_classes > 256:
        return Image.fromarray(labels.astype(np.uint16))
    colors = palette(num_classes) if colors is None else np.asarray(colors, dtype=np.uint8)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(colors)] = colors
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(table.flatten().tolist())
    return im


def legend_metrics(image_height: int) -> dict:
    """Sizes in pixels of the legend of an image `image_height` pixels high."""
    font = max(MIN_FONT, round(image_height * FONT_PER_HEIGHT))
    return {"font": font, "swatch": font, "row": round(font * 1.5), "pad": max(4, font // 2),
            "border": max(2, font // 6), "outline": max(1, round(image_height / 400))}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def _boundaries(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of a change of label."""
    edge = np.zeros(labels.shape, dtype=bool)
    dy = labels[1:] != labels[:-1]
    dx = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    for _ in range(width - 1):  # grow by one pixel per round
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def overlay(image: Image.Image, labels: np.ndarray, class_names: Sequence[str],
            colors: Optional[np.ndarray] = None, background_index: Optional[int] = None
            ) -> Image.Image:
    """The photo blended with the class colours, regions outlined, and a legend of the classes
    present (largest area first) to its right (module docstring)."""
    labels = np.asarray(labels)
    n = len(class_names)
    colors = palette(n, background_index) if colors is None else np.asarray(colors, np.uint8)
    photo = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = legend_metrics(labels.shape[0])

    tinted = labels != background_index if background_index is not None else np.ones_like(labels, bool)
    color_map = colors[labels].astype(np.float32)
    blend = np.where(tinted[..., None], (1 - OVERLAY_ALPHA) * photo + OVERLAY_ALPHA * color_map, photo)
    blend = np.rint(blend).astype(np.uint8)
    counts = np.bincount(labels.flatten(), minlength=n)
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    edge = _boundaries(labels, m["outline"]) & tinted
    blend[edge] = colors[labels[edge]]
    # each region's average look, outline included, for its swatch
    means = {i: blend[labels == i].reshape(-1, 3).mean(0).round().astype(np.uint8) for i in present}
    picture = Image.fromarray(blend)

    font = _font(m["font"])
    probe = ImageDraw.Draw(picture)
    text_w = max((probe.textlength(class_names[i], font=font) for i in present), default=0)
    legend_w = int(m["pad"] * 3 + m["swatch"] + text_w)
    height = max(picture.height, m["pad"] * 2 + m["row"] * len(present))
    canvas = Image.new("RGB", (picture.width + legend_w, height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, i in enumerate(present):
        x, y = picture.width + m["pad"], m["pad"] + row * m["row"]
        s = m["swatch"]
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=tuple(int(v) for v in colors[i]))
        b = m["border"]
        draw.rectangle([x + b, y + b, x + s - 1 - b, y + s - 1 - b],
                       fill=tuple(int(v) for v in means[i]))
        if isinstance(font, ImageFont.FreeTypeFont):  # centred on the swatch
            draw.text((x + s + m["pad"], y + s / 2), class_names[i], fill="black", font=font,
                      anchor="lm")
        else:
            draw.text((x + s + m["pad"], y), class_names[i], fill="black", font=font)
    return canvas
