"""Compiles every candidate config of the baseline attention kernels (kernels/baseline_attention.py)
for a GPU target without a GPU, through the backend's real launch path (see compile_only.py), as
compile_for_gpu.py does for the others. Run with TRITON_INTERPRET unset or 0:

    python tools/compile_baselines_for_gpu.py [--arch 90] [--dtype bfloat16 ...] [--head-dim 64 ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_only import compile_only  # noqa: E402
from compile_for_gpu import DTYPES  # noqa: E402

from armfast.ops._backends import triton as _triton  # noqa: E402


def baseline_kernels(dtype: torch.dtype, d: int) -> None:
    """ClearCLIP, SCLIP and NACLIP at a 448 px crop (785 tokens), ProxyCLIP on a 28 x 28 VFM grid,
    SC-CLIP's similarity ops at 785 tokens."""
    x, k, v = (torch.randn(2, 12, 785, d, dtype=dtype) for _ in range(3))
    out = torch.empty_like(x)
    _triton.baselines.self_correlation_forward(x, v, d ** -0.5, out)
    _triton.baselines.self_correlation_sum_forward(x, k, v, d ** -0.5, out)
    _triton.baselines.gaussian_self_correlation_forward(x, v, d ** -0.5, 28, 28, 5.0, True, out)
    f, vf = torch.randn(2, 784, 768, dtype=dtype), torch.randn(2, 12, 784, d, dtype=dtype)
    _triton.baselines.masked_affinity_forward(f, vf, 1.2, 3.0, torch.empty_like(vf))
    # SC-CLIP's similarity ops at 785 tokens: aggregation of 768-wide features, the dual softmax
    f, x = torch.randn(2, 785, 768, dtype=dtype), torch.randn(2, 785, 768, dtype=dtype)
    _triton.similarity.similarity_aggregation_forward(f, x, 0.4, torch.empty_like(x))
    _triton.similarity.averaged_dual_softmax_forward(f, k, v, d ** -0.5, 1.0, 3.0, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--dtype", action="append", choices=DTYPES)
    parser.add_argument("--head-dim", action="append", type=int)
    parser.add_argument("--tf32", action="store_true", help="float32 matmul precision 'high'")
    args = parser.parse_args(argv)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    with compile_only(args.arch) as driver:
        for name in args.dtype or ["bfloat16"]:
            for d in args.head_dim or [64]:
                seen = len(driver.kernels)
                baseline_kernels(getattr(torch, name), d)
                print(f"baseline attentions {name} d={d}", flush=True)
                for kernel in driver.kernels[seen:]:
                    print(f"  {kernel.name:<20} {kernel.config:<70} smem={kernel.shared:>6} "
                          f"regs={kernel.registers:>3} spill={kernel.spill_bytes:>4} "
                          f"wgmma={kernel.wgmma:d} mma.sync={kernel.mma_sync:d} "
                          f"local={kernel.local_memory:d}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
