"""Training labels checked before the first step: every mask of the training set is read once
(masks only, in the data-loading processes, sharded over the ranks) and a value that is
neither a class id nor ignore stops the run with the masks named; otherwise a bad mask is found
only when a worker loads it, hours in.

A successful scan is remembered in ``OUT/labels-checked.json`` under a fingerprint of the mask
files (paths, sizes, modification times) and the label mapping, so a resumed run does not
read them again.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from .._files import atomic_write_text
from ..data.base import IGNORE_INDEX, SegDataset
from .distributed import DistInfo, all_reduce_sum

RECORD = "labels-checked.json"
SHOWN = 3  # masks named in the error


def fingerprint(dataset: SegDataset) -> str:
    """Changes when a mask file, the class count or the label mapping changes."""
    h = hashlib.sha256()
    h.update(f"{type(dataset).__name__}:{dataset.num_classes}:"
             f"{getattr(dataset, 'reduce_zero_label', '')}".encode())
    lut = getattr(dataset, "_lut", None)
    if lut is not None:
        h.update(lut.tobytes())
    for s in dataset.samples:
        st = os.stat(s.mask) if os.path.exists(s.mask) else None
        h.update(f"{s.mask}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()


class _MaskScan(Dataset):
    """Item i -> (index, invalid raw values, error text): nothing raises in a worker."""

    def __init__(self, dataset: SegDataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        try:
            raw, labels = self.dataset.read_labels(index)
            return index, self.dataset.invalid_values(raw, labels), ""
        except (OSError, ValueError) as exc:
            return index, [], " ".join(str(exc).split())


def _as_is(item):
    return item


@dataclass
class LabelScan:
    checked: int = 0
    bad: list[tuple[Path, list[int]]] = field(default_factory=list)  # (mask, invalid values)
    unreadable: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return len(self.bad) + len(self.unreadable)


def scan_labels(dataset: SegDataset, *, workers: int = 0, rank: int = 0, world_size: int = 1,
                progress: bool = False) -> LabelScan:
    """Reads this rank's share of the masks (every `world_size`-th) with `workers` processes."""
    indices = list(range(rank, len(dataset), world_size))
    loader = DataLoader(_MaskScan(dataset, indices), batch_size=None, num_workers=workers,
                        collate_fn=_as_is)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, total=len(indices), desc="check labels", unit="mask",
                      dynamic_ncols=True, file=sys.stderr, leave=False)
    result = LabelScan()
    for index, values, error in loader:
        result.checked += 1
        if error:
            result.unreadable.append(error)
        elif values:
            result.bad.append((dataset.samples[index].mask, values))
    return result


def describe_failures(dataset: SegDataset, scan: LabelScan, total_failures: int) -> str:
    """One line: how many masks failed, the first ones with their values, what to run."""
    C = dataset.num_classes
    parts = [f"{mask} (values {values[:6]})" for mask, values in scan.bad[:SHOWN]]
    parts += scan.unreadable[:max(0, SHOWN - len(parts))]
    shown = "; ".join(parts) if parts else "see the other processes' messages"
    return (f"training labels: {total_failures} of {len(dataset)} masks cannot be used: values "
            f"must be a class id 0..{C - 1} ({C} classes, after the dataset's label mapping) or "
            f"{IGNORE_INDEX} (ignore); first: {shown}. armfast check-dataset reports them all")


def load_record(out: Path) -> dict:
    try:
        return json.loads((Path(out) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def save_record(out: Path, dataset: SegDataset, digest: str) -> None:
    atomic_write_text(Path(out) / RECORD, json.dumps(
        {"fingerprint": digest, "masks": len(dataset), "classes": dataset.num_classes}) + "\n")


def check_labels(dataset: SegDataset, out: Path, *, workers: int, progress: bool,
                 info: DistInfo) -> None:
    """Every mask's labels scanned (`scan_labels`, shared among the processes), ValueError
    naming the bad files; a clean scan is recorded in `out` and not repeated for these masks."""
    digest = fingerprint(dataset)
    if load_record(out).get("fingerprint") == digest:
        return  # this run (or its earlier part) read these very masks
    start = time.perf_counter()
    scan = scan_labels(dataset, workers=workers, rank=info.rank, world_size=info.world_size,
                       progress=progress and info.is_main)
    failures = int(all_reduce_sum(scan.failures, info))
    if failures:
        raise ValueError(describe_failures(dataset, scan, failures))
    if info.is_main:
        save_record(out, dataset, digest)
        print(f"armfast train: labels of the {len(dataset)} training masks checked "
              f"({time.perf_counter() - start:.0f} s; --no-label-check skips this)", flush=True)
