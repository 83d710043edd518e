"""Measured ceilings of the device, the yardsticks for TFLOP/s and GB/s: a large square matmul
(compute) and a large tensor copy (memory bandwidth), timed like every case."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .timer import TimerConfig, measure

# matmul size and copy size (bytes) per device type; the small ones for --quick
SIZES = {"cuda": {"full": (8192, 2 << 30), "quick": (4096, 512 << 20)},
         "cpu": {"full": (4096, 256 << 20), "quick": (2048, 64 << 20)}}


@dataclass(frozen=True)
class Ceilings:
    matmul_tflops: float  # n x n @ n x n in the benchmark dtype: 2 n^3 FLOPs
    copy_gbps: float  # dst.copy_(src): bytes read + bytes written
    matmul_n: int
    copy_bytes: int
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def measure_ceilings(device: str | torch.device, dtype: torch.dtype, config: TimerConfig, *,
                     quick: bool = False) -> Ceilings:
    device = torch.device(device)
    n, nbytes = SIZES.get(device.type, SIZES["cpu"])["quick" if quick else "full"]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_s = measure(lambda: torch.matmul(a, b), device, config).median_s
    del a, b
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    copy_s = measure(lambda: dst.copy_(src), device, config).median_s
    return Ceilings(matmul_tflops=2 * n ** 3 / matmul_s / 1e12, copy_gbps=2 * nbytes / copy_s / 1e9,
                    matmul_n=n, copy_bytes=nbytes, dtype=str(dtype).replace("torch.", ""))
