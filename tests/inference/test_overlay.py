"""The overlay: no class drawn black, swatches that look like their regions, a legend that is
readable at any image size."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from armfast.background import Background
from armfast.inference.result import SegmentationResult
from armfast.inference.visualize import palette


def result(labels, photo, names, background=None):
    labels = torch.as_tensor(labels)
    n = len(names)
    bg = background or Background()
    colors = palette(n, bg.index if bg.enabled else None) if bg.enabled else palette(n)
    return SegmentationResult(
        labels=labels, probs=torch.zeros(n, *labels.shape), class_names=names,
        palette=colors, background=bg,
        image=torch.as_tensor(photo).permute(2, 0, 1).contiguous())


def test_no_named_class_is_black():
    assert not (palette(200) == 0).all(1).any()
    photo = np.full((8, 8, 3), 200, np.uint8)
    r = result(np.zeros((8, 8), np.int64), photo, ["cat", "dog"])
    blended = np.asarray(r.overlay())[4, 4]
    assert blended.mean() > 0.5 * 200  # class 0 tints the photo, it does not darken it to half
    png = r.label_image()
    assert tuple(png.getpalette()[:3]) == tuple(int(v) for v in r.palette[0])
    # a background class keeps VOC's black (class 0) in the label PNG
    assert (palette(21, background_index=0)[0] == 0).all()


def _swatch(canvas, width, row, m):
    x = width + m["pad"] + m["swatch"] // 2
    y = m["pad"] + row * m["row"] + m["swatch"] // 2
    return canvas[y, x], canvas[m["pad"] + row * m["row"] + 1, width + m["pad"] + 1]


def test_swatches_match_their_regions():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    labels = np.zeros((60, 90), np.int64)
    labels[:, 30:] = 1
    labels[:, 75:] = 2  # areas: class 1 > class 0 > class 2
    r = result(labels, photo, ["road", "car", "sky"])
    canvas = np.asarray(r.overlay()).astype(int)
    from armfast.inference.visualize import legend_metrics

    m = legend_metrics(60)
    picture = canvas[:60, :90]
    for row, cls in enumerate((1, 0, 2)):  # largest area first
        inside, border = _swatch(canvas, 90, row, m)
        region = picture[labels == cls]
        interior = picture[(labels == cls) & ~_near_edge(labels, m["outline"])]
        # the swatch shows the region's average look; its border is the pure class colour
        assert np.abs(inside - region.mean(0)).max() <= 2, (cls, inside, region.mean(0))
        assert tuple(border) == tuple(int(v) for v in r.palette[cls])
        # inside the region: the photo blended with the class colour, halfway
        ph = photo[(labels == cls) & ~_near_edge(labels, m["outline"])].astype(int)
        assert np.abs(interior - (ph + r.palette[cls]) / 2).max() <= 1


def _near_edge(labels, width):
    from armfast.inference.visualize import _boundaries

    return _boundaries(labels, width)


def test_background_is_left_untinted():
    photo = np.full((10, 10, 3), 120, np.uint8)
    labels = np.zeros((10, 10), np.int64)
    labels[:, 5:] = 1
    r = result(labels, photo, ["background", "cat"], Background.threshold(0.3))
    canvas = np.asarray(r.overlay())
    assert (canvas[:10, :3] == 120).all()  # background pixels away from the edge: the photo


def test_legend_scales_with_the_image():
    from armfast.inference.visualize import legend_metrics

    small, big = legend_metrics(40), legend_metrics(4000)
    assert small["font"] >= 12 and big["font"] >= 4000 / 40
    # drawn text really is that big: dark pixels of the first legend row span most of the font
    labels = np.zeros((1200, 1800), np.int64)
    labels[600:] = 1
    photo = np.full((1200, 1800, 3), 90, np.uint8)
    canvas = np.asarray(result(labels, photo, ["grass", "sky"]).overlay().convert("L"))
    m = legend_metrics(1200)
    row = canvas[m["pad"]:m["pad"] + m["row"], 1800 + m["pad"] * 2 + m["swatch"]:]
    ys = np.nonzero((row < 100).any(1))[0]
    assert len(ys) and ys.max() - ys.min() >= 0.5 * m["font"], (m, ys)
    # and the legend fits beside an image of any size
    assert Image.fromarray(canvas).height == 1200
