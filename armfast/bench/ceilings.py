"""Measured ceilings of the device, the yardsticks for TFLOP/s and GB/s: a large square matmul
and, on the CPU, the FMA units' peak (compute), and a large tensor copy (memory bandwidth), with
every thread torch uses.

The compute ceiling is the larger of the matmul and the FMA peak (`compute_ceiling`). On a GPU the
matmul is the real peak; on the CPU torch's float32 matmul ran at under 40% of two AVX-512 cores'
FMA rate, and hand-written kernels then read 200% of it, so there the peak of independent FMA
chains on every thread (armfast._C.fma_peak, the ISA the kernels use) bounds every row.

A ceiling is the best the device did, not its typical speed: each is the fastest of several
single calls, while the cases report their median. On a shared machine the median of a short
matmul once read half the device's rate (0.087 TFLOP/s on two cores), and fused kernels then
showed at 466% of it. The matmul is large enough to run at the BLAS's full rate in quick mode
too (only the number of calls drops)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Mapping, Optional

import torch

from .timer import TimerConfig, measure

# matmul size and copy size (bytes) per device type; the small ones for --quick
SIZES = {"cuda": {"full": (8192, 2 << 30), "quick": (4096, 512 << 20)},
         "cpu": {"full": (4096, 256 << 20), "quick": (3072, 64 << 20)}}
CALLS = {"full": 9, "quick": 5}  # single calls timed; the fastest one counts
# rounds of the FMA chains per thread and call: about 30 ms (full) or 8 ms at 4 GHz on AVX-512
FMA_ITERATIONS = {"full": 1 << 24, "quick": 1 << 22}
FMA_DTYPES = {torch.float32: "float32", torch.float64: "float64"}  # those fma_peak runs in


@dataclass(frozen=True)
class Ceilings:
    matmul_tflops: float  # n x n @ n x n in the benchmark dtype: 2 n^3 FLOPs
    copy_gbps: float  # dst.copy_(src): bytes read + bytes written
    matmul_n: int
    copy_bytes: int
    dtype: str
    peak_tflops: Optional[float] = None  # CPU: the FMA units' measured peak (None: not measured)
    peak_isa: Optional[str] = None  # the instruction set it ran with (ARMFAST_CPU_ISA caps it)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def compute_tflops(self) -> float:
        return compute_ceiling(self.to_dict())

    def summary(self) -> str:
        peak = f", FMA peak {self.peak_tflops:.3g} TFLOP/s" if self.peak_tflops else ""
        return f"matmul {self.matmul_tflops:.3g} TFLOP/s{peak}, copy {self.copy_gbps:.3g} GB/s"

    def best(self, other: "Ceilings") -> "Ceilings":
        """The faster of two measurements of each ceiling (before and after the cases: the
        load of a shared machine changes during a run)."""
        peaks = [p for p in (self.peak_tflops, other.peak_tflops) if p is not None]
        return replace(self, matmul_tflops=max(self.matmul_tflops, other.matmul_tflops),
                       copy_gbps=max(self.copy_gbps, other.copy_gbps),
                       peak_tflops=max(peaks) if peaks else None,
                       peak_isa=self.peak_isa or other.peak_isa)


def compute_ceiling(ceilings: Optional[Mapping]) -> Optional[float]:
    """The compute ceiling of a `Ceilings.to_dict()` (stored JSON included, whose older files
    have no FMA peak): the larger of the matmul and the FMA peak; None without ceilings."""
    if not ceilings or ceilings.get("matmul_tflops") is None:
        return None
    return max(ceilings["matmul_tflops"], ceilings.get("peak_tflops") or 0.0)


def best_of(calls: int, warmup: int = 1) -> TimerConfig:
    """A timer config of `calls` single-call rounds, whatever they take."""
    return TimerConfig(min_round_s=0.0, rounds=calls, max_total_s=1e9, warmup=max(1, warmup))


def fma_peak(dtype: torch.dtype, iterations: int, calls: int) -> Optional[tuple[float, str]]:
    """(TFLOP/s, ISA) of the CPU's FMA units on torch's threads, the fastest of `calls` calls
    after one warm-up; None where armfast._C is missing or has no kernel for `dtype`."""
    from ..ops._backends._extension import load
    ext, _ = load("_C")
    if ext is None or dtype not in FMA_DTYPES:
        return None
    threads = torch.get_num_threads()
    ext.fma_peak(FMA_DTYPES[dtype], max(1, iterations // 8), threads)  # wakes the threads
    runs = [ext.fma_peak(FMA_DTYPES[dtype], iterations, threads) for _ in range(calls)]
    return max(r["flops"] / r["seconds"] for r in runs) / 1e12, ext.isa()


def measure_ceilings(device: str | torch.device, dtype: torch.dtype, config: TimerConfig, *,
                     quick: bool = False) -> Ceilings:
    device, mode = torch.device(device), "quick" if quick else "full"
    n, nbytes = SIZES.get(device.type, SIZES["cpu"])[mode]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = best_of(CALLS[mode], config.warmup)
    matmul_s = min(measure(lambda: torch.matmul(a, b), device, best).per_call_s)
    del a, b
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    copy_s = min(measure(lambda: dst.copy_(src), device, best).per_call_s)
    peak = fma_peak(dtype, FMA_ITERATIONS[mode], CALLS[mode]) if device.type == "cpu" else None
    return Ceilings(matmul_tflops=2 * n ** 3 / matmul_s / 1e12, copy_gbps=2 * nbytes / copy_s / 1e9,
                    matmul_n=n, copy_bytes=nbytes, dtype=str(dtype).replace("torch.", ""),
                    peak_tflops=peak and peak[0], peak_isa=peak and peak[1])
