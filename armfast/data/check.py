"""What is wrong with a segmentation dataset: pairing, sizes, label values (`armfast check-dataset`).

`check_dataset` reads every mask (and every image's header) of a reader, built-in or
`FolderDataset`, and reports

- problems (the data cannot be used as it is): images without masks and masks without images,
  unreadable files, image/mask size mismatches, label values that are neither a class id nor
  ``ignore_index``;
- warnings (it can be used, but probably not as meant): labels that look like instance ids
  (a mask with more distinct values than there are classes; values past the last class; masks
  that each number their regions 0..k or 1..k and together use only the bottom of the class
  range), labels that run 1..C (0 unused: ``reduce_zero_label`` missing?), mostly ignored pixels;
- the raw value histogram and the class histogram (pixels and images per class).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import UnidentifiedImageError

from .base import IGNORE_INDEX, SegDataset, read_mask, unchecked_files

INSTANCE_MIN_MASKS = 8  # masks with >= 3 labels needed before the "numbered regions" guess
INSTANCE_RUN_FRACTION = 0.9  # share of those masks whose labels are a run 0..k or 1..k
MOSTLY_IGNORED = 0.5


@dataclass
class DatasetReport:
    name: str
    num_classes: int
    class_names: list[str]
    samples: int = 0  # pairs listed
    checked: int = 0  # pairs whose files could be read
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    raw_values: Counter = field(default_factory=Counter)  # raw mask value -> pixels
    class_pixels: Optional[np.ndarray] = None  # [C] pixels per class (after label mapping)
    class_images: Optional[np.ndarray] = None  # [C] masks holding the class
    ignored_pixels: int = 0
    invalid_pixels: int = 0  # neither a class id nor ignore

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "samples": self.samples,
                "checked": self.checked, "ok": self.ok, "problems": self.problems,
                "warnings": self.warnings,
                "raw_values": {int(k): int(v) for k, v in sorted(self.raw_values.items())},
                "classes": [{"id": i, "name": n, "pixels": int(self.class_pixels[i]),
                             "images": int(self.class_images[i])}
                            for i, n in enumerate(self.class_names)],
                "ignored_pixels": self.ignored_pixels, "invalid_pixels": self.invalid_pixels}


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) as shown (EXIF orientation applied, as the readers do), from the header."""
    from .images import displayed_size

    return displayed_size(path)


def _some(items, limit: int = 3) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _is_run(values: np.ndarray) -> bool:
    """Labels 0..k or 1..k with nothing missing (what numbering regions per image gives)."""
    return len(values) >= 3 and values[0] in (0, 1) and values[-1] - values[0] + 1 == len(values)


def check_dataset(dataset: SegDataset, *, pairing_problems=(), progress: bool = False
                  ) -> DatasetReport:
    """Reads every sample of `dataset` (built-in reader or FolderDataset) and reports on it
    (module docstring). `pairing_problems`: lines found while pairing files (FolderDataset)."""
    from .folder import FolderDataset, read_label_map

    folder = isinstance(dataset, FolderDataset)
    C = dataset.num_classes
    names = [n[0] for n in (getattr(dataset, "class_names", None) or _class_names(dataset))]
    if folder and dataset.has_background:
        names[0] = f"{names[0]} (background)" if names[0].lower() != "background" else names[0]
    report = DatasetReport(dataset.name, C, names, samples=len(dataset.samples))
    report.problems.extend(pairing_problems)
    report.class_pixels = np.zeros(C, dtype=np.int64)
    report.class_images = np.zeros(C, dtype=np.int64)
    lut = None if folder else (dataset.label_lut if dataset.label_lut is not None
                               else np.arange(256, dtype=np.int64))
    missing, unreadable, mismatched, invalid_masks = [], [], [], []
    invalid_values: Counter = Counter()
    too_many, per_mask_values = [], []

    samples = dataset.samples
    if progress:
        import sys

        from tqdm.auto import tqdm

        samples = tqdm(samples, desc=f"check {dataset.name}", unit="mask", file=sys.stderr)
    for s in samples:
        absent = [p for p in (s.image, s.mask) if not Path(p).is_file()]
        if absent:
            missing.extend(absent)
            continue
        try:
            size = _image_size(s.image)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            unreadable.append(f"{s.image} ({exc})")
            continue
        try:
            raw = read_label_map(s.mask) if folder else read_mask(s.mask).astype(np.int64)
        except (ValueError, OSError) as exc:
            unreadable.append(str(exc))
            continue
        report.checked += 1
        if raw.shape != size:
            mismatched.append(f"{s.mask} is {raw.shape[1]}x{raw.shape[0]}, image {s.image} is "
                              f"{size[1]}x{size[0]}")
        values, counts = np.unique(raw, return_counts=True)
        report.raw_values.update(dict(zip(values.tolist(), counts.tolist())))
        labels = dataset.labels(raw) if folder else lut[np.clip(raw, 0, 255)]
        ignored = labels == IGNORE_INDEX
        bad = ~ignored & ((labels < 0) | (labels >= C))
        report.ignored_pixels += int(ignored.sum())
        if bad.any():
            report.invalid_pixels += int(bad.sum())
            invalid_values.update(np.unique(raw[bad]).tolist())
            invalid_masks.append(s.mask)
        valid = labels[~ignored & ~bad]
        hist = np.bincount(valid, minlength=C)[:C]
        report.class_pixels += hist
        report.class_images += hist > 0
        distinct = np.unique(raw[raw != IGNORE_INDEX])
        if len(distinct) > C:
            too_many.append(f"{s.mask} ({len(distinct)} values)")
        per_mask_values.append(distinct)

    if missing:
        report.problems.append(f"{len(missing)} file(s) missing: {_some(missing)}")
    if unreadable:
        report.problems.append(f"{len(unreadable)} unreadable file(s): {_some(unreadable)}")
    if mismatched:
        report.problems.append(f"{len(mismatched)} image/mask size mismatch(es): {_some(mismatched)}")
    if invalid_masks:
        values = sorted(invalid_values)
        report.problems.append(
            f"{len(invalid_masks)} mask(s) hold values that are neither a class id (0..{C - 1} "
            f"after the reader's mapping) nor ignore {IGNORE_INDEX}: values {_some(values, 10)}; "
            f"first in {_some(invalid_masks)}")
    _instance_warnings(report, too_many, per_mask_values, invalid_values)
    _label_warnings(report, folder and dataset.reduce_zero_label)
    if report.samples and not report.checked:
        report.problems.append("no sample could be read")
    return report


def _class_names(dataset) -> list[list[str]]:
    from .classnames import load_class_names

    try:
        names = load_class_names(dataset.classnames)
    except (FileNotFoundError, ValueError):
        names = []
    if len(names) != dataset.num_classes:
        names = [[f"class_{i}"] for i in range(dataset.num_classes)]
    elif dataset.has_background:  # line 0 lists background words; "sky" would mislead here
        names[0] = ["background"]
    return names


def _instance_warnings(report: DatasetReport, too_many, per_mask_values, invalid_values) -> None:
    C = report.num_classes
    if too_many:
        report.warnings.append(
            f"labels look like instance ids, not class ids: {len(too_many)} mask(s) hold more "
            f"distinct values than the {C} classes: {_some(too_many)}")
    big = [v for v in invalid_values if v >= C and v != IGNORE_INDEX]
    if big and not too_many:
        report.warnings.append(
            f"values past the last class id {C - 1} ({_some(sorted(big), 6)}): instance ids, a "
            f"class file with too few lines, or ids of another label set?")
    labelled = [v for v in per_mask_values if len(v) >= 3]
    if len(labelled) >= INSTANCE_MIN_MASKS:
        runs = sum(_is_run(v) for v in labelled)
        top = max(int(v[-1]) for v in labelled)
        if runs >= INSTANCE_RUN_FRACTION * len(labelled) and 2 * (top + 1) <= C:
            report.warnings.append(
                f"labels look like per-image instance ids: {runs} of {len(labelled)} masks number "
                f"their regions as a run 0..k or 1..k, and all values stay under {top + 1} of "
                f"{C} classes")


def _label_warnings(report: DatasetReport, reduced: bool) -> None:
    C = report.num_classes
    raw = {v for v in report.raw_values if v != IGNORE_INDEX}
    if not reduced and raw and 0 not in raw and C in raw and max(raw) == C:
        report.warnings.append(
            f"mask values run 1..{C} and 0 never occurs: if 0 means 'unlabelled' and k is class "
            f"k-1, pass --reduce-zero-label")
    total = sum(report.raw_values.values())
    if total and report.ignored_pixels > MOSTLY_IGNORED * total:
        report.warnings.append(
            f"{report.ignored_pixels / total:.0%} of the pixels are ignored ({IGNORE_INDEX}"
            f"{' or raw 0 under --reduce-zero-label' if reduced else ''})")


def format_report(report: DatasetReport, *, max_values: int = 40) -> str:
    """The report as text: counts, value and class histograms, problems, warnings, verdict."""
    lines = [f"{report.name}: {report.samples} pair(s) listed, {report.checked} read, "
             f"{report.num_classes} classes"]
    total = sum(report.raw_values.values())
    if total:
        items = sorted(report.raw_values.items())
        shown = ", ".join(f"{v} ({c / total:.1%})" for v, c in items[:max_values])
        more = f", ... ({len(items) - max_values} more values)" if len(items) > max_values else ""
        lines.append(f"raw label values: {shown}{more}")
        valid = max(int(report.class_pixels.sum()), 1)
        width = max(len(n) for n in report.class_names)
        lines.append(f"class histogram ({report.ignored_pixels / total:.1%} ignored, "
                     f"{report.invalid_pixels / total:.1%} invalid):")
        lines.append(f"  {'id':>4}  {'class':<{width}}  {'pixels':>7}  {'images':>6}")
        for i, n in enumerate(report.class_names):
            lines.append(f"  {i:>4}  {n:<{width}}  {report.class_pixels[i] / valid:>7.2%}  "
                         f"{int(report.class_images[i]):>6}")
        absent = [n for i, n in enumerate(report.class_names) if report.class_images[i] == 0]
        if absent:
            lines.append(f"classes never present ({len(absent)}): {_some(absent, 10)}")
    for p in report.problems:
        lines.append(f"problem: {p}")
    for w in report.warnings:
        lines.append(f"warning: {w}")
    lines.append("verdict: " + ("OK" if report.ok else f"{len(report.problems)} problem(s)")
                 + (f", {len(report.warnings)} warning(s)" if report.warnings else ""))
    return "\n".join(lines)


def open_for_check(name: str, root=None, split: str = "val", *, images=None, masks=None,
                   class_file=None, reduce_zero_label: bool = False, has_background=None,
                   limit=None):
    """(dataset, pairing problems) for `check_dataset`: a FolderDataset that keeps the pairs
    there are, or a built-in reader listing its samples even when files are missing."""
    from .datasets import build_dataset
    from .folder import FolderDataset

    if name == "folder":
        ds = FolderDataset(images, masks, class_file, reduce_zero_label=reduce_zero_label,
                           has_background=has_background, limit=limit, strict=False)
        return ds, ds.pairing.problems()
    with unchecked_files():
        return build_dataset(name, root, split, limit=limit), []
