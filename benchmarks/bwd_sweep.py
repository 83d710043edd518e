"""Sweeps the triton attention backward's launch configs at ARM's shapes (B=16 crops; H=8, N=784
and 785; H=12, N=785; bfloat16 and float16; d = 64 and 128), keeps each shape's fastest where the
tuner reads it in the next process (its disk cache: ARMFAST_TRITON_TUNING_CACHE, see
kernels/_tuning.py), and prints forward+backward against SDPA's in the same run:

    python benchmarks/bwd_sweep.py [--json FILE] [--cache-copy FILE]    # on a GPU, < 4 minutes
    TRITON_INTERPRET=1 python benchmarks/bwd_sweep.py --dry             # CPU, toy shape

Each config is timed with triton.testing.do_bench (median) on the atomic-dQ path (the default;
the preprocess launch included). --dry runs the same code on the CPU under the Triton
interpreter at one toy shape, timing one call each with a CPU timer: it checks the path, its
numbers mean nothing.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time

import torch
import torch.nn.functional as F

GPU_SHAPES = [(16, H, N, d, dtype) for dtype in (torch.bfloat16, torch.float16) for d in (64, 128)
              for H, N in ((8, 784), (8, 785), (12, 785))]
DRY_SHAPES = [(1, 2, 40, 16, torch.float32)]


def _do_bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def _once(fn) -> float:
    """ms of one call after one warm-up call (the dry run's stand-in for do_bench)."""
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _fwd_bwd(op, q, k, v, dout):
    def step():
        for t in (q, k, v):
            t.grad = None
        op(q, k, v).backward(dout)
    return step


def sweep_shape(B, H, N, d, dtype, device, dry: bool) -> dict:
    from armfast.kernels import _tuning
    from armfast.ops import attention
    from armfast.ops._backends.triton import attention as launcher
    from armfast.ops._backends.triton._launch import attention_constexprs, kind, shared

    timer = _once if dry else _do_bench
    q, k, v, dout = (torch.randn(B, H, N, d, dtype=dtype, device=device) for _ in range(4))
    scale = d ** -0.5
    out = torch.empty_like(q)
    lse = launcher.attention_forward(q, k, v, scale, out)
    precision = shared().common.dot_precision(dtype)
    ks = launcher.kernels()
    key = launcher._attention_key(q, N, precision, False)
    constexprs = attention_constexprs(q, precision, DQ_ATOMIC=True)
    family, device_id = (("sm90", "cpu (dry run)") if dry else _tuning.device_facts(q.device))
    configs = ks.module.bwd_configs(family, kind(dtype, precision), constexprs["BLOCK_D"])
    delta = torch.empty(B * H * N, dtype=torch.float32, device=device)
    dq_acc = torch.empty(q.shape, dtype=torch.float32, device=device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    run = functools.partial(launcher._launch_bwd, dout, q, k, v, lse, delta, dk, dv, dq_acc, out,
                            scale)
    times = ks.bwd.sweep(key, constexprs, configs, device_id, run, timer=timer)
    best = min(range(len(configs)), key=times.__getitem__)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    triton_op = functools.partial(attention, backend="triton")
    triton_ms = timer(_fwd_bwd(triton_op, *leaves, dout))
    sdpa_ms = timer(_fwd_bwd(F.scaled_dot_product_attention, *leaves, dout))
    return {"B": B, "H": H, "N": N, "d": d, "dtype": str(dtype).replace("torch.", ""),
            "configs": [_tuning.describe(c) for c in configs],
            "bwd_ms": [round(t, 5) if t != float("inf") else None for t in times],
            "best": _tuning.describe(configs[best]), "fwd_bwd_ms": round(triton_ms, 5),
            "sdpa_fwd_bwd_ms": round(sdpa_ms, 5), "ratio_to_sdpa": round(sdpa_ms / triton_ms, 3)}


def _table(rows) -> str:
    lines = [f"{'shape':<18}{'dtype':<10}{'best (M, N, warps, stages)':<30}"
             f"{'bwd ms per config':<28}{'fwd+bwd ms':>11}{'sdpa ms':>9}{'x sdpa':>8}"]
    for r in rows:
        best = r["best"]
        tiles = (f"{best['kwargs']['BLOCK_M']}, {best['kwargs']['BLOCK_N']}, "
                 f"{best['num_warps']}, {best['num_stages']}")
        per = " ".join("-" if t is None else f"{t:.3f}" for t in r["bwd_ms"])
        lines.append(f"{r['B']}x{r['H']}x{r['N']}x{r['d']:<6}{r['dtype']:<10}{tiles:<30}"
                     f"{per:<28}{r['fwd_bwd_ms']:>11.3f}{r['sdpa_fwd_bwd_ms']:>9.3f}"
                     f"{r['ratio_to_sdpa']:>8.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true",
                        help="CPU and the Triton interpreter, one toy shape")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--cache-copy", help="copy the tuner's disk cache here afterwards")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("bwd_sweep: needs a CUDA GPU (or --dry)", file=sys.stderr)
        return 2
    from armfast.kernels import _tuning
    rows = [sweep_shape(*shape, device="cpu" if args.dry else "cuda", dry=args.dry)
            for shape in (DRY_SHAPES if args.dry else GPU_SHAPES)]
    print(_table(rows))
    cache = _tuning.DISK.path()
    print(f"winners written to the tuner's cache: {cache}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.cache_copy and cache is not None and cache.exists():
        shutil.copy(cache, args.cache_copy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
