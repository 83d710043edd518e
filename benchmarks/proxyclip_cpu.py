"""ProxyCLIP's masked affinity attention on the CPU: the cpu backend's kernel against the sdpa
composition, float32, ViT-B/8 VFM features (C = 768) and 12 heads of 64, on the benchmark's
inputs (`armfast.bench.workloads.affinity_features`). The two run interleaved, one call each
per round, so that a loaded machine slows both alike; the medians are printed, with the load:

    python benchmarks/proxyclip_cpu.py [--threads 2] [--rounds 7] [--shapes 1x784,16x784,1x3136]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from armfast import ops
from armfast.bench.workloads import affinity_features, baseline_call

C, H, D = 768, 12, 64


def _inputs(B: int, n: int):
    f, beta = affinity_features(B, n, C, torch.Generator().manual_seed(0))
    v = torch.randn(B, H, n, D, generator=torch.Generator().manual_seed(1))
    return f.float(), v, beta


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", default="1x784,16x784,1x3136", help="BxN,...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, rounds {args.rounds}, load {os.getloadavg()}")
    for shape in args.shapes.split(","):
        B, n = (int(x) for x in shape.split("x"))
        f, v, beta = _inputs(B, n)
        calls = {"cpu": lambda: ops.masked_affinity_attention(f, v, beta=beta, backend="cpu"),
                 "sdpa": lambda: baseline_call("masked_affinity_attention", "sdpa")(f, v, beta=beta)}
        error = float((calls["cpu"]() - calls["sdpa"]()).abs().max())  # also the warm-up
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                times[name].append(_time(fn))
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"B={B} n={n}: cpu {med['cpu'] * 1e3:.1f} ms, sdpa {med['sdpa'] * 1e3:.1f} ms, "
              f"cpu/sdpa speed-up {med['sdpa'] / med['cpu']:.2f}x (max |cpu - sdpa| {error:.1e}); "
              f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
