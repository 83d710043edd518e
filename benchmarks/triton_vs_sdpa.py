"""Issue 13's table on a GPU: the triton backend's attention against SDPA, forward and
forward+backward, bfloat16, d = 64, at the issue's shapes, through the public op
(`armfast.ops.attention`, tuned configs). Also the cold cost of the first call per shape bucket
and the host-bound rate of small calls. Needs a GPU (about a minute on an H200):

    python benchmarks/triton_vs_sdpa.py [--json FILE]

TF/s counts 4 B H N^2 d per forward and 3.5x that for forward+backward (armfast.bench.cases).
The first-call column is the first forward+backward of each shape in this process (compile and
tuning of a new bucket; ARMFAST_TRITON_TUNING_CACHE=off and a fresh TRITON_CACHE_DIR make it
cold).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(1, 8, 196), (16, 12, 785), (64, 12, 785), (48, 16, 1025), (8, 8, 4096)]
D = 64


def _bench(fn, grads=()):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median") * 1e3


def _host_rate(fn, calls=2000) -> float:
    """Microseconds per call when calls are issued back to back (host-bound for small shapes)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    from armfast.ops import attention
    rows = []
    for B, H, N in SHAPES:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)

        def triton_fwd():
            with torch.no_grad():
                return attention(q, k, v, backend="triton")

        def triton_train():
            attention(q, k, v, backend="triton").backward(dout)

        def sdpa_fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v)

        def sdpa_train():
            F.scaled_dot_product_attention(q, k, v).backward(dout)

        torch.cuda.synchronize()
        start = time.perf_counter()
        triton_train()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        flops = 4 * B * H * N * N * D
        row = {"B": B, "H": H, "N": N, "first_call_s": round(first, 3)}
        for name, fn, work in (("sdpa_fwd", sdpa_fwd, flops), ("triton_fwd", triton_fwd, flops),
                               ("sdpa_train", sdpa_train, 3.5 * flops),
                               ("triton_train", triton_train, 3.5 * flops)):
            us = _bench(fn, (q, k, v))
            row[name + "_us"] = round(us, 1)
            row[name + "_tflops"] = round(work / us / 1e6, 1)
        row["fwd_ratio"] = round(row["sdpa_fwd_us"] / row["triton_fwd_us"], 2)
        row["train_ratio"] = round(row["sdpa_train_us"] / row["triton_train_us"], 2)
        if B * H * N <= 2048:
            row["triton_fwd_host_us"] = round(_host_rate(triton_fwd), 1)
            row["sdpa_fwd_host_us"] = round(_host_rate(sdpa_fwd), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'B, H, N':<14}{'sdpa fwd':>10}{'triton fwd':>12}{'x sdpa':>8}"
          f"{'sdpa f+b':>10}{'triton f+b':>12}{'x sdpa':>8}{'1st call':>10}")
    for r in rows:
        print(f"{r['B']}, {r['H']}, {r['N']:<8}{r['sdpa_fwd_us']:>8.0f}us"
              f"{r['triton_fwd_us']:>10.0f}us{r['fwd_ratio']:>8.2f}"
              f"{r['sdpa_train_us']:>8.0f}us{r['triton_train_us']:>10.0f}us"
              f"{r['train_ratio']:>8.2f}{r['first_call_s']:>9.2f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
