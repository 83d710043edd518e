"""A dataset of your own: a folder of images, a folder of masks and a class-name file.

Images and masks pair by their path relative to their folder, without the extension
(``images/a/x.jpg`` with ``masks/a/x.png``). Masks are single-channel label maps (PNG, BMP or
TIFF; 8-bit, or 16-bit for more than 255 classes) whose value at a pixel is the index of its
class in the class file (line 1 = class 0), ``255`` where the pixel does not count
(``ignore_index``). Colour-coded RGB masks are refused: they need a colour -> class table first.
``reduce_zero_label=True`` reads value 0 as "ignore" and k as class k - 1 (mmseg's convention for
masks whose 0 means "unlabelled").

No config file: ``armfast eval --dataset folder --images DIR --masks DIR --class-file F`` and
``armfast train`` take the same three paths; ``armfast check-dataset`` reports what is wrong
with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import IGNORE_INDEX, Sample, SegDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
MASK_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I")


def _files(folder: Path, suffixes) -> dict[str, list[Path]]:
    """Relative stem (posix, no extension) -> files with that stem."""
    out: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
            out.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    return out


@dataclass(frozen=True)
class Pairing:
    """How the files of two folders pair up by stem."""

    samples: list[Sample]  # stems with exactly one image and one mask
    images_without_mask: list[Path]
    masks_without_image: list[Path]
    ambiguous: dict[str, list[Path]]  # stems with several images or several masks

    @property
    def ok(self) -> bool:
        return not (self.images_without_mask or self.masks_without_image or self.ambiguous)

    def problems(self, limit: int = 3) -> list[str]:
        def some(paths):
            shown = ", ".join(str(p) for p in paths[:limit])
            return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")

        out = []
        if self.images_without_mask:
            out.append(f"{len(self.images_without_mask)} image(s) without a mask: "
                       f"{some(self.images_without_mask)}")
        if self.masks_without_image:
            out.append(f"{len(self.masks_without_image)} mask(s) without an image: "
                       f"{some(self.masks_without_image)}")
        for stem, paths in list(self.ambiguous.items())[:limit]:
            out.append(f"stem {stem!r} names several files: {some(paths)}")
        if len(self.ambiguous) > limit:
            out.append(f"... and {len(self.ambiguous) - limit} more ambiguous stems")
        return out


def pair_folders(images: Path, masks: Path) -> Pairing:
    """Pairs every image in `images` with the mask of the same relative stem in `masks`."""
    images, masks = Path(images).expanduser(), Path(masks).expanduser()
    for label, folder in (("images", images), ("masks", masks)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{label} folder not found: {folder}")
    if images.resolve() == masks.resolve():
        raise ValueError(f"images and masks must be different folders, both are {images}")
    image_files, mask_files = _files(images, IMAGE_SUFFIXES), _files(masks, MASK_SUFFIXES)
    ambiguous = {s: image_files.get(s, []) + mask_files.get(s, [])
                 for s in sorted(set(image_files) | set(mask_files))
                 if len(image_files.get(s, [])) > 1 or len(mask_files.get(s, [])) > 1}
    samples = [Sample(image_files[s][0], mask_files[s][0], s) for s in image_files
               if s in mask_files and s not in ambiguous]
    return Pairing(samples,
                   [p[0] for s, p in image_files.items() if s not in mask_files],
                   [p[0] for s, p in mask_files.items() if s not in image_files],
                   ambiguous)


def read_label_map(path: Path) -> np.ndarray:
    """A single-channel label map ``[H, W]`` as int64 (8- or 16-bit; palette PNGs give their
    indices). Missing files raise FileNotFoundError, unreadable or colour ones ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                hint = (" (a colour-coded mask: convert it to class indices first)"
                        if im.mode in ("RGB", "RGBA") else "")
                raise ValueError(f"mask {path} has PIL mode {im.mode!r}; expected a single-channel "
                                 f"label map (8-bit 'L'/'P' or 16-bit){hint}")
            return np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read mask {path}: {exc}") from exc


class FolderDataset(SegDataset):
    """Your own data (module docstring). ``num_classes``, ``classnames`` (the class file) and
    ``has_background`` are per instance.

    Args:
        images, masks: the two folders.
        class_file: class-name file, one class per line (comma-separated synonyms).
        reduce_zero_label: read mask value 0 as ignore and k as class k - 1.
        has_background: whether class 0 is a background class (the background rules of
            `armfast.background` apply); None: when the class file's first name is
            "background".
        limit: the first N pairs only (sorted by stem).
        strict: raise ValueError when some image has no mask, some mask no image, or a stem
            names several files (False: use the pairs there are).
    """

    name = "folder"
    num_classes = 0  # set per instance from the class file

    def __init__(self, images, masks, class_file, *, reduce_zero_label: bool = False,
                 has_background: Optional[bool] = None, limit: Optional[int] = None,
                 strict: bool = True):
        from .classnames import load_class_names

        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        if class_file is None:
            raise ValueError("class_file is required: a text file with one class per line")
        self.classnames = str(class_file)
        self.class_names = load_class_names(Path(class_file))
        self.num_classes = len(self.class_names)
        if self.num_classes > IGNORE_INDEX and not reduce_zero_label:
            # 255 is ignore; 16-bit masks can hold more classes, but one id would collide
            raise ValueError(f"class_file lists {self.num_classes} classes; at most {IGNORE_INDEX} "
                             f"fit next to ignore_index {IGNORE_INDEX}")
        self.reduce_zero_label = bool(reduce_zero_label)
        if has_background is None:
            has_background = self.class_names[0][0].strip().lower() == "background"
        self.has_background = bool(has_background)
        self.root = Path(images).expanduser()
        self.mask_root = Path(masks).expanduser()
        self.split = "all"
        self.pairing = pair_folders(self.root, self.mask_root)
        if strict and not self.pairing.ok:
            raise ValueError(f"images {self.root} and masks {self.mask_root} do not pair up: "
                             + "; ".join(self.pairing.problems())
                             + " (armfast check-dataset lists them all; strict=False uses the pairs)")
        if not self.pairing.samples:
            raise ValueError(f"no image/mask pairs in {self.root} and {self.mask_root} (pairing is "
                             f"by file name without extension)")
        samples = self.pairing.samples
        self.samples = samples[:limit] if limit else samples

    def labels(self, raw: np.ndarray) -> np.ndarray:
        """Raw mask values -> class ids (255 = ignore)."""
        if not self.reduce_zero_label:
            return raw
        out = raw - 1
        out[raw == 0] = IGNORE_INDEX
        out[raw == IGNORE_INDEX] = IGNORE_INDEX
        return out

    def read_labels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raw = read_label_map(self.samples[index].mask)
        return raw, self.labels(raw)

    def invalid_message(self, mask: Path, values: list[int]) -> str:
        return (f"mask {mask} holds values {values[:8]} that are neither a class id "
                f"(0..{self.num_classes - 1}, {self.classnames}) nor {IGNORE_INDEX}; instance "
                f"ids? run armfast check-dataset")

    def __repr__(self) -> str:
        return (f"FolderDataset(images={str(self.root)!r}, masks={str(self.mask_root)!r}, "
                f"classes={self.num_classes}, n={len(self)})")
