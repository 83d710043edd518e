"""Cold first calls: the wall time of the first forward+backward of each fused backend in a
fresh process, per dtype, head dim and size, and of the call after it.

The first call of the Triton backend compiles (and autotunes) its kernels; a user pays that at
the start of every new shape bucket. Triton's kernel cache and armfast's tuning cache are
pointed at an empty folder before anything imports Triton, so the numbers are cold even on a
machine that ran them before.

    python -m armfast.bench.first_calls --device cuda --json first_calls.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def _cases(device: str):
    """(op, dtype name, dim, size) in the order a user meets them: small shapes first."""
    dtypes = ("bfloat16", "float16", "float32") if device == "cuda" else ("float32",)
    for dtype in dtypes:
        for d in (64, 32, 128):
            for n in (196, 785):
                yield "attention", dtype, d, n
        for classes in (21, 171):
            yield "patch_text_logits", dtype, 512, classes


def _call(op: str, backend: str, dtype, dim: int, size: int, device: str):
    import torch

    from .. import ops

    g = torch.Generator(device).manual_seed(0)
    if op == "attention":
        q, k, v = (torch.randn(1, 8, size, dim, generator=g, device=device, dtype=dtype)
                   .requires_grad_() for _ in range(3))
        out = ops.attention(q, k, v, backend=backend)
        out.backward(torch.ones_like(out))
    else:
        x = torch.randn(2, 196, dim, generator=g, device=device, dtype=dtype).requires_grad_()
        text = torch.randn(size, dim, generator=g, device=device, dtype=dtype).requires_grad_()
        out = ops.patch_text_logits(x, text, logit_scale=40.0, backend=backend)
        out.backward(torch.ones_like(out))


def measure(device: str, backends: list[str]) -> list[dict]:
    import torch

    from .timer import synchronize

    rows = []
    for op, dtype_name, dim, size in _cases(device):
        dtype = getattr(torch, dtype_name)
        for backend in backends:
            row = {"op": op, "backend": backend, "dtype": dtype_name, "dim": dim, "size": size}
            try:
                times = []
                for _ in range(2):
                    synchronize(device)
                    start = time.perf_counter()
                    _call(op, backend, dtype, dim, size, device)
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                row.update(first_s=times[0], second_s=times[1])
            except Exception as exc:  # an unsupported dtype or head dim: say so, go on
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--backends", default="triton,cuda",
                        help="comma-separated fused backends (default: triton,cuda)")
    parser.add_argument("--json", metavar="OUT", help="write the rows as JSON")
    args = parser.parse_args(argv)
    cold = tempfile.mkdtemp(prefix="armfast-cold-triton-")  # no compiled kernel, no tuning choice
    os.environ["TRITON_CACHE_DIR"] = cold
    os.environ["ARMFAST_TRITON_TUNING_CACHE"] = os.path.join(cold, "tuning.json")
    from ..ops import backend_status

    status = backend_status(args.device)
    backends = [b for b in args.backends.split(",") if status.get(b) is None]
    skipped = {b: status.get(b, "unknown backend") for b in args.backends.split(",") if b not in backends}
    rows = measure(args.device, backends)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "skipped": skipped, "rows": rows}, f, indent=1)
    for b, why in skipped.items():
        print(f"{b}: not measured ({why})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
