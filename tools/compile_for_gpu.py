"""Compiles every candidate config of the Triton kernels for a GPU target, without a GPU, through
the backend's real launch path (see compile_only.py), and prints what the compiler made of each:

    python tools/compile_for_gpu.py [--arch 90] [--dtype bfloat16 ...] [--head-dim 64 ...]
                                           [--tf32] [--skip-logits] [--json FILE]

One row per compiled kernel: config, shared memory, registers, ptxas spill bytes, and whether the
PTX has wgmma (Hopper tensor cores), mma.sync (Ampere ones), TMA and local memory. The interpreter
misses what only GPU compilation checks (constexpr globals, dot shapes and dtypes, layouts); run
with TRITON_INTERPRET unset or 0. Exits non-zero on the first compilation error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_only import compile_only  # noqa: E402

from armfast.ops._backends import triton as _triton  # noqa: E402

DTYPES = ("float16", "bfloat16", "float32")


def attention_kernels(dtype: torch.dtype, d: int) -> None:
    """Forward, backward (atomic dQ) and deterministic backward at lengths that end in partial
    tiles, large enough for the TMA forward's candidates; the tuner loads every candidate once."""
    q = torch.randn(2, 48, 785, d, dtype=dtype)
    k = torch.randn(2, 48, 700, d, dtype=dtype)
    out, lse = _triton.BACKEND.attention.run_forward(q, k, k, d ** -0.5, False)
    _triton.attention.attention_backward(out, q, k, k, out, lse, d ** -0.5)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _triton.attention.attention_backward(out, q, k, k, out, lse, d ** -0.5)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def logits_kernels(dtype: torch.dtype) -> None:
    x = torch.randn(2, 197, 512, dtype=dtype)
    text = torch.randn(171, 512, dtype=dtype)
    scale = torch.tensor(10.0)
    out = _triton.patch_text_logits.patch_text_logits_forward(x, text, scale)
    _triton.patch_text_logits.patch_text_logits_backward(out, x, text, scale)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--dtype", action="append", choices=DTYPES)
    parser.add_argument("--head-dim", action="append", type=int)
    parser.add_argument("--tf32", action="store_true", help="float32 dots on TF32 tensor cores")
    parser.add_argument("--skip-logits", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    rows = []
    with compile_only(args.arch) as driver:
        for name in args.dtype or ["bfloat16"]:
            dtype = getattr(torch, name)
            jobs = [(f"attention {name} d={d}", attention_kernels, (dtype, d))
                    for d in args.head_dim or [64]]
            if not args.skip_logits:
                jobs.append((f"patch_text_logits {name}", logits_kernels, (dtype,)))
            for title, job, job_args in jobs:
                seen, start = len(driver.kernels), time.time()
                job(*job_args)
                print(f"{title}: {sum(driver.compiles.values())} compiles so far, "
                      f"{time.time() - start:.1f}s", flush=True)
                for kernel in driver.kernels[seen:]:
                    row = {"what": title, "kernel": kernel.name, "config": kernel.config,
                           "shared": kernel.shared, "registers": kernel.registers,
                           "spill_bytes": kernel.spill_bytes, "wgmma": kernel.wgmma,
                           "mma_sync": kernel.mma_sync, "tma": kernel.tma,
                           "local": kernel.local_memory}
                    rows.append(row)
                    print(f"  {kernel.name:<20} {kernel.config:<58} smem={kernel.shared:>6} "
                          f"regs={kernel.registers:>3} spill={kernel.spill_bytes:>4} "
                          f"wgmma={kernel.wgmma:d} mma.sync={kernel.mma_sync:d} "
                          f"tma={kernel.tma:d} local={kernel.local_memory:d}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
