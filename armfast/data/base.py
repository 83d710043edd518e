"""Common machinery of the segmentation readers: sample lists, image/mask loading, label maps.

Every reader yields ``{"image": uint8 [3, H, W], "mask": int64 [H, W], "name": str}`` with the
dataset's train ids in ``mask`` and ``IGNORE_INDEX`` (255) on pixels that do not count.
Missing files raise ``FileNotFoundError`` and unreadable or inconsistent ones ``ValueError``,
both naming the path.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IGNORE_INDEX = 255

# `unchecked_files()` turns the readers' missing-file errors off so that `armfast check-dataset`
# can list every sample, with or without its files, and report what is missing
_CHECK_FILES: contextvars.ContextVar[bool] = contextvars.ContextVar("armfast_check_files",
                                                                     default=True)


@contextlib.contextmanager
def unchecked_files():
    """Inside this block, readers list their samples without checking that the files exist."""
    token = _CHECK_FILES.set(False)
    try:
        yield
    finally:
        _CHECK_FILES.reset(token)


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path
    name: str


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3], as a viewer shows the file (`armfast.data.images.to_rgb`: EXIF
    orientation, transparency, 16-bit and CMYK images)."""
    from .images import open_rgb

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return np.asarray(open_rgb(path), dtype=np.uint8).copy()


def read_mask(path: Path) -> np.ndarray:
    """Single-channel uint8 label map [H, W] (palette PNGs give their indices, as in mmseg)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(f"annotation {path} has PIL mode {im.mode!r}; expected a "
                                 f"single-channel 8-bit label map (mode 'L' or 'P')")
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read annotation {path}: {exc}") from exc


def identity_lut() -> np.ndarray:
    return np.arange(256, dtype=np.int64)


def reduce_zero_label_lut() -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255, k -> k - 1, 255 stays 255."""
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


class SegDataset(Dataset):
    """Base class of the readers. Subclasses set the class attributes and `list_samples`.

    ``root`` may be the dataset directory itself or a parent that holds it under one of
    ``search_dirs`` (e.g. the mmseg ``data/`` folder), so one ``--root`` can serve several
    datasets.
    """

    name: ClassVar[str]
    num_classes: ClassVar[int]
    classnames: ClassVar[str]  # file stem under armfast/data/classnames
    has_background: ClassVar[bool] = False  # class 0 is "background" (prob_thd applies)
    splits: ClassVar[dict[str, str]] = {"train": "train", "val": "val"}
    marker: ClassVar[str]  # a relative path that exists in the dataset directory
    search_dirs: ClassVar[tuple[str, ...]] = ()
    label_lut: ClassVar[np.ndarray | None] = None  # raw PNG value -> train id (None: identity)

    def __init__(self, root: str | Path, split: str = "val", *, limit: int | None = None):
        if split not in self.splits:
            raise ValueError(f"{self.name}: split must be one of {sorted(self.splits)}, got {split!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        self.root = self.locate(root)
        self.split = split
        samples = self.list_samples(self.root, self.splits[split])
        if not samples:
            raise ValueError(f"{self.name}: no {split} samples found under {self.root}")
        self.samples: list[Sample] = samples[:limit] if limit else samples
        self._lut = self.label_lut if self.label_lut is not None else identity_lut()

    # ---- layout -------------------------------------------------------------------------
    @classmethod
    def locate(cls, root: str | Path) -> Path:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{cls.name}: dataset root {root} is not a directory")
        candidates = [root] + [root / d for d in cls.search_dirs]
        for c in candidates:
            if (c / cls.marker).exists():
                return c
        tried = ", ".join(str(c / cls.marker) for c in candidates)
        raise FileNotFoundError(f"{cls.name}: cannot find the dataset under {root}; looked for {tried}")

    @classmethod
    def list_samples(cls, root: Path, split_dir: str) -> list[Sample]:
        raise NotImplementedError

    # ---- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def read_labels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(raw mask values, train ids) of sample `index`, not checked: the mask alone, which
        is what a scan of the labels reads."""
        raw = read_mask(self.samples[index].mask)
        return raw, self._lut[raw]

    def invalid_values(self, raw: np.ndarray, labels: np.ndarray) -> list[int]:
        """The raw values whose train ids are neither a class id nor `IGNORE_INDEX`."""
        bad = ((labels >= self.num_classes) | (labels < 0)) & (labels != IGNORE_INDEX)
        return sorted(set(raw[bad].tolist())) if bad.any() else []

    def invalid_message(self, mask: Path, values: list[int]) -> str:
        return (f"annotation {mask} holds values {values[:8]} that are neither a {self.name} "
                f"class id (0..{self.num_classes - 1} after mapping) nor {IGNORE_INDEX}")

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 [H, W, 3], int64 train ids [H, W]) of sample `index`."""
        s = self.samples[index]
        image = read_image(s.image)
        raw, mask = self.read_labels(index)
        if image.shape[:2] != raw.shape:
            raise ValueError(f"annotation {s.mask} is {raw.shape[1]}x{raw.shape[0]} but image "
                             f"{s.image} is {image.shape[1]}x{image.shape[0]}")
        values = self.invalid_values(raw, mask)
        if values:
            raise ValueError(self.invalid_message(s.mask, values))
        return image, mask

    def __getitem__(self, index: int) -> dict:
        image, mask = self.load(index)
        return {"image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                "mask": torch.from_numpy(mask), "name": self.samples[index].name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


# ---- helpers for subclasses ---------------------------------------------------------------
def read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    ids = [line.strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise ValueError(f"split list {path} is empty")
    return ids


def require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"directory not found: {path}")
    return path


def pair_by_ids(ids: Sequence[str], image_dir: Path, image_suffix: str, mask_dir: Path,
                mask_suffix: str) -> list[Sample]:
    """Samples for listed ids; every listed file must exist (reported with the first missing one)."""
    require_dir(image_dir), require_dir(mask_dir)
    samples = [Sample(image_dir / f"{i}{image_suffix}", mask_dir / f"{i}{mask_suffix}", i) for i in ids]
    check_exist(samples)
    return samples


def pair_by_glob(image_dir: Path, pattern: str, image_suffix: str, mask_dir: Path,
                 mask_suffix: str, recursive: bool = False) -> list[Sample]:
    """Samples for every image matching `pattern`; the mask shares the image's stem (and
    sub-folder) with `image_suffix` replaced by `mask_suffix`."""
    require_dir(image_dir), require_dir(mask_dir)
    images = sorted(image_dir.rglob(pattern) if recursive else image_dir.glob(pattern))
    samples = []
    for img in images:
        rel = img.relative_to(image_dir).as_posix()
        stem = rel[: -len(image_suffix)]
        samples.append(Sample(img, mask_dir / f"{stem}{mask_suffix}", Path(stem).name))
    check_exist(samples, images=False)
    return samples


def check_exist(samples: Sequence[Sample], images: bool = True) -> None:
    if not _CHECK_FILES.get():
        return
    for kind in (("image", "mask") if images else ("mask",)):
        missing = [getattr(s, kind) for s in samples if not getattr(s, kind).is_file()]
        if missing:
            label = "image" if kind == "image" else "annotation"
            raise FileNotFoundError(f"{label} file not found: {missing[0]}"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
