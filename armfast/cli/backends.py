"""`armfast backends`: which backends run on this machine, and why the others do not."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("backends", help="list the op backends and whether they run here")
    p.add_argument("--device", action="append", choices=("cpu", "cuda"),
                   help="device type to check (repeatable; default: cpu, and cuda if present)")
    return p


def run(args) -> int:
    import torch

    from ..ops import backend_status

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        print(f"{device}:")
        for name, reason in backend_status(device).items():
            print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0
