"""What `backend="auto"` picks: the fastest backend measured on this kind of device.

The table (``auto_table.json`` beside this file, or the file named by ``ARMFAST_AUTO_TABLE``)
is written by ``armfast bench --tune --write-table`` from a benchmark run. One entry per

    (op, device kind, dtype, dim, mode, size bucket) -> backend

- device kind: ``cpu``, or ``cuda-sm90`` style (compute capability) for GPUs;
- dim: the op's width (attention and the baseline attentions: the head dim d;
  patch_text_logits: the embedding dim E), read with the FLOPs off the call (`_specs.OPS`);
- mode: ``forward`` (no gradient needed) or ``train`` (forward and backward);
- size bucket: ``floor(log4(forward FLOPs))``, so one entry covers a 4x range of work.

An entry names a fused backend only if it was at least as fast as sdpa at every benchmark
shape in its bucket; where the table has no entry, `auto` takes sdpa (`FALLBACK`): a backend
that has not been measured faster is never picked.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from .._files import atomic_write_text
from ._limits import dtype_name
from ._specs import OPS

FALLBACK = "sdpa"
TABLE_ENV = "ARMFAST_AUTO_TABLE"
PACKAGED_TABLE = Path(__file__).with_name("auto_table.json")
FORMAT = 1
MODES = ("forward", "train")


def bucket(work: int) -> int:
    """floor(log4(work)): size buckets 4x apart."""
    return (int(work).bit_length() - 1) // 2


def bucket_range(b: int) -> str:
    """The forward FLOPs a bucket covers, for people."""
    return f"{_si(4 ** b)}-{_si(4 ** (b + 1))} FLOP"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


_kinds: dict[torch.device, str] = {}


def device_kind(device: torch.device) -> str:
    """``cpu``, ``cuda-sm90`` (GPUs by compute capability), or the device type."""
    kind = _kinds.get(device)
    if kind is None:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            kind = f"cuda-sm{major}{minor}"
        else:
            kind = device.type
        _kinds[device] = kind
    return kind


# -- the table --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    backend: str
    source: str  # why: the measurement behind it, or that there was none


def table_path() -> Path:
    return Path(os.environ.get(TABLE_ENV) or PACKAGED_TABLE)


_table: Optional[dict] = None


def table() -> dict:
    """The table as stored: {"format", "measurements", "entries"}; empty when absent."""
    global _table
    if _table is None:
        _table = read_table(table_path())
    return _table


def read_table(path: Path) -> dict:
    empty = {"format": FORMAT, "measurements": [], "entries": []}
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return empty
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"the auto table {path} cannot be read ({exc}); fix or delete it, or "
                           f"point {TABLE_ENV} at another file") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RuntimeError(f"the auto table {path} is not in format {FORMAT}; rewrite it with "
                           f"`armfast bench --tune --write-table {path}`")
    return data


def entry_key(e: dict) -> tuple:
    return e["op"], e["device"], e["dtype"], e["dim"], e["mode"], e["bucket"]


_index: Optional[dict] = None


def _entries() -> dict[tuple, dict]:
    global _index
    if _index is None:
        _index = {entry_key(e): e for e in table()["entries"]}
    return _index


def clear_cache() -> None:
    global _table, _index
    _table = _index = None
    _kinds.clear()


def lookup(op: str, device: torch.device, dtype: torch.dtype, dim: Optional[int], train: bool,
           size_bucket: int) -> Choice:
    kind = device_kind(device)
    mode = "train" if train else "forward"
    e = _entries().get((op, kind, dtype_name(dtype), dim, mode, size_bucket))
    if e is None:
        return Choice(FALLBACK, "no measurement for this case")
    return Choice(e["backend"], f"measured: {e['vs_sdpa']:.2f}x sdpa at {', '.join(e['shapes'])}")


# -- writing it from a benchmark --------------------------------------------------------------

def case_key(op: str, shape: dict) -> Optional[tuple[int, int]]:
    """(dim, bucket) of a benchmark case of `op`, or None for ops the table does not hold."""
    spec = OPS.get(op)
    if spec is None:
        return None
    dim, work = spec.key(*(shape[n] for n in spec.sizes))
    return dim, bucket(work)


def choose(records: Iterable[dict], device_kind_name: str) -> list[dict]:
    """Table entries from benchmark records (``armfast bench --json``'s "results"): per group of
    cases sharing a key, the backend with the least total time among those at least as fast as
    sdpa at every case of the group (sdpa itself when none is)."""
    groups: dict[tuple, dict[str, dict[str, float]]] = {}
    labels: dict[tuple, list[str]] = {}
    for r in records:
        ck = case_key(r["op"], r["shape"])
        if ck is None or r.get("median_s") is None or r.get("error"):
            continue
        key = (r["op"], device_kind_name, r["dtype"], ck[0], r["mode"], ck[1])
        groups.setdefault(key, {}).setdefault(r["backend"], {})[r["label"]] = r["median_s"]
        labels.setdefault(key, [])
        if r["label"] not in labels[key]:
            labels[key].append(r["label"])
    entries = []
    for key, by_backend in sorted(groups.items(), key=lambda kv: str(kv[0])):
        sdpa = by_backend.get(FALLBACK)
        if not sdpa:
            continue
        cases = list(sdpa)
        best, best_total = FALLBACK, sum(sdpa.values())
        for name, times in by_backend.items():
            if name == FALLBACK or any(c not in times for c in cases):
                continue
            if all(times[c] <= sdpa[c] for c in cases) and sum(times[c] for c in cases) < best_total:
                best, best_total = name, sum(times[c] for c in cases)
        op, kind, dtype, dim, mode, b = key
        entries.append({"op": op, "device": kind, "dtype": dtype, "dim": dim, "mode": mode,
                        "bucket": b, "backend": best,
                        "vs_sdpa": round(sum(sdpa.values()) / best_total, 3),
                        "shapes": [c for c in labels[key] if c in sdpa]})
    return entries


def write_table(path: Path, entries: list[dict], measurement: dict) -> dict:
    """Merges `entries` (one device kind) into the table at `path`, replacing that device kind's
    old entries of the same ops and dtypes, and writes it atomically. Returns the new table."""
    path = Path(path)
    data = read_table(path)
    replaced = {(e["op"], e["device"], e["dtype"]) for e in entries}
    kept = [e for e in data["entries"] if (e["op"], e["device"], e["dtype"]) not in replaced]
    kinds = {e["device"] for e in entries}
    data["entries"] = sorted(kept + entries, key=lambda e: tuple(map(str, entry_key(e))))
    data["measurements"] = [m for m in data["measurements"]
                            if not (m.get("device") in kinds and m.get("dtype") == measurement.get("dtype"))]
    data["measurements"].append(measurement)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    clear_cache()
    return data
