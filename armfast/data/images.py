"""Images as a viewer shows them, whatever Pillow reads: EXIF orientation applied, every mode
made 8-bit RGB the way it looks.

- the EXIF Orientation tag (phone photos are often stored sideways) is applied;
- transparency (RGBA, LA, PA, palette or grey images with a transparent colour) is composited
  onto a white background, as a page shows it (dropping alpha would show whatever colour
  the transparent pixels happen to store);
- 16-bit greyscale (``I;16``, and ``I`` holding values past 255) is scaled from 0..65535,
  float greyscale (``F``) from 0..1 (clipped to 0..255 when it holds larger values): Pillow's
  own conversion clips them, which turns most 16-bit images white;
- CMYK, YCbCr, LAB, HSV, 1-bit and 8-bit grey convert with Pillow's conversions.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = (255, 255, 255)  # under transparent pixels
ORIENTATION = 0x0112  # EXIF tag
_SWAPS_SIDES = (5, 6, 7, 8)  # orientations that rotate by 90 degrees


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _scaled_grey(im: Image.Image) -> Image.Image:
    """``I;16*``, ``I``, ``F`` greyscale -> 8-bit ``L``, by the range of the format."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
        # 16-bit data ("I" is how older Pillows read 16-bit PNG/TIFF); "I" holding 0..255
        # came from an 8-bit image and stays as it is
        a = a.astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image, background=BACKGROUND) -> Image.Image:
    """`im` as the 8-bit RGB picture a viewer shows (module docstring)."""
    im = ImageOps.exif_transpose(im) or im
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _scaled_grey(im).convert("RGB")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert an image of mode {im.mode!r} to RGB ({exc})") from exc


def open_rgb(path: Union[str, os.PathLike]) -> Image.Image:
    """The image file at `path` as `to_rgb` makes it; OSError/ValueError naming the file
    when it is missing or not a readable image."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no image file at {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def displayed_size(path: Union[str, os.PathLike]) -> tuple[int, int]:
    """(H, W) of the image as shown (after its EXIF orientation), from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(ORIENTATION, 1)
        except Exception:  # noqa: BLE001 -- a damaged EXIF block: the stored orientation
            orientation = 1
    return (w, h) if orientation in _SWAPS_SIDES else (h, w)
