"""Measured ceilings of the device, the yardsticks for TFLOP/s and GB/s: a large square matmul
(compute) and a large tensor copy (memory bandwidth), with every thread torch uses.

A ceiling is the best the device did, not its typical speed: each is the fastest of several
single calls, while the cases report their median. On a shared machine the median of a short
matmul once read half the device's rate (0.087 TFLOP/s on two cores), and fused kernels then
showed at 466% of it. The matmul is large enough to run at the BLAS's full rate in quick mode
too (only the number of calls drops)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from .timer import TimerConfig, measure

# matmul size and copy size (bytes) per device type; the small ones for --quick
SIZES = {"cuda": {"full": (8192, 2 << 30), "quick": (4096, 512 << 20)},
         "cpu": {"full": (4096, 256 << 20), "quick": (3072, 64 << 20)}}
CALLS = {"full": 9, "quick": 5}  # single calls timed; the fastest one counts


@dataclass(frozen=True)
class Ceilings:
    matmul_tflops: float  # n x n @ n x n in the benchmark dtype: 2 n^3 FLOPs
    copy_gbps: float  # dst.copy_(src): bytes read + bytes written
    matmul_n: int
    copy_bytes: int
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)

    def best(self, other: "Ceilings") -> "Ceilings":
        """The faster of two measurements of each ceiling (before and after the cases: the
        load of a shared machine changes during a run)."""
        return replace(self, matmul_tflops=max(self.matmul_tflops, other.matmul_tflops),
                       copy_gbps=max(self.copy_gbps, other.copy_gbps))


def best_of(calls: int, warmup: int = 1) -> TimerConfig:
    """A timer config of `calls` single-call rounds, whatever they take."""
    return TimerConfig(min_round_s=0.0, rounds=calls, max_total_s=1e9, warmup=max(1, warmup))


def measure_ceilings(device: str | torch.device, dtype: torch.dtype, config: TimerConfig, *,
                     quick: bool = False) -> Ceilings:
    device = torch.device(device)
    n, nbytes = SIZES.get(device.type, SIZES["cpu"])["quick" if quick else "full"]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = best_of(CALLS["quick" if quick else "full"], config.warmup)
    matmul_s = min(measure(lambda: torch.matmul(a, b), device, best).per_call_s)
    del a, b
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    copy_s = min(measure(lambda: dst.copy_(src), device, best).per_call_s)
    return Ceilings(matmul_tflops=2 * n ** 3 / matmul_s / 1e12, copy_gbps=2 * nbytes / copy_s / 1e9,
                    matmul_n=n, copy_bytes=nbytes, dtype=str(dtype).replace("torch.", ""))
