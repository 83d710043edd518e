"""`armfast backends`: which backends run on this machine, why the others do not, and what
`backend="auto"` picks, with the measurement behind each choice."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("backends", help="list the op backends, whether they run here, and what auto picks")
    p.add_argument("--device", action="append", choices=("cpu", "cuda"),
                   help="device type to check (repeatable; default: cpu, and cuda if present)")
    return p


def auto_lines(device) -> list[str]:
    """What auto picks on `device`: one line per table entry of its kind (and, where the
    measured backend cannot run here, what auto takes instead and why), then the rule for
    everything else."""
    import torch

    from ..ops import _auto, _registry
    from ..ops._specs import OPS

    kind = _auto.device_kind(device)
    table = _auto.table()
    lines = [f"auto (table {_auto.table_path()}, device kind {kind}):"]
    for m in table["measurements"]:
        if m.get("device") == kind:
            lines.append(f"  measured {m.get('dtype')} on {m.get('device_name')}, {m.get('date')}, "
                         f"torch {m.get('torch')}: {m.get('command')}")
    for e in table["entries"]:
        if e["device"] == kind:
            lines.append(f"  {e['op']:<17} {e['dtype']:<8} dim={e['dim']:<4} {e['mode']:<7} "
                         f"{_auto.bucket_range(e['bucket']):<20} -> {e['backend']:<9} "
                         f"({e['vs_sdpa']:.2f}x sdpa at {'; '.join(e['shapes'])})")
            spec = OPS.get(e["op"])
            if spec is None:
                continue
            why = _registry.explain(e["op"], "auto", getattr(torch, e["dtype"]), device,
                                    dim=e["dim"], head_dim=e["dim"] if spec.head_dim else None,
                                    train=e["mode"] == "train", bucket=e["bucket"])
            if why.backend != e["backend"]:
                lost = next(c for c in why.candidates if c.backend == e["backend"])
                lines.append(f"  {'':<17} here auto takes {why.backend}: "
                             f"{'; '.join(lost.reasons)}")
    lines.append(f"  anything else      -> {_auto.FALLBACK} (not measured on this device kind)")
    lines.append("  (armfast.ops.explain(op, *args) says which backend a given call runs on, "
                 "and why each other one does not)")
    return lines


def run(args) -> int:
    import torch

    from ..ops import backend_status

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        print(f"{device}:")
        for name, reason in backend_status(device).items():
            print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        if device == "cpu" or torch.cuda.is_available():
            print("\n".join(auto_lines(torch.device(device))))
    return 0
