"""Compiles the baseline attention kernels (kernels/baseline_attention.py) for a GPU target
without a GPU, as compile_for_gpu.py does for the others. Run with TRITON_INTERPRET unset or 0:

    python tests/triton/compile_baselines_for_gpu.py [--arch 90] [--dtype bfloat16 ...]
                                                     [--head-dim 64 ...] [--all-configs]
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget

from armfast.kernels import _common
from armfast.kernels import baseline_attention as ba
from compile_for_gpu import TYPES, _compile, _configs


def baseline_kernels(dtype, d, target, all_configs):
    t, acc = TYPES[dtype], "fp32"
    precision = "tf32" if dtype == torch.float32 else "ieee"
    common = dict(ACC_DTYPE=_common.acc_dtype(dtype), DOT_PRECISION=precision, HEAD_DIM=d)
    floats = ("sm_scale", "bias_coef", "gamma")
    for dual, bias in ((False, False), (True, False), (False, True)):
        print(f"self_corr_fwd {t} d={d} DUAL={dual} BIAS={bias}")
        for config in _configs(ba.self_corr_fwd, all_configs):
            _compile(ba.self_corr_fwd, dict(X=t, X2=t, V=t, O=t),
                     {**common, "BLOCK_D": max(16, triton.next_power_of_2(d)), "DUAL": dual,
                      "BIAS": bias}, config, target, floats=floats)
    print(f"masked_affinity_fwd {t} d={d}")
    for config in _configs(ba.masked_affinity_fwd, all_configs):
        _compile(ba.masked_affinity_fwd, dict(F=t, RNORM=acc, THRESH=acc, V=t, O=t), common, config,
                 target, floats=floats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--dtype", action="append", choices=[str(d)[6:] for d in TYPES])
    parser.add_argument("--head-dim", action="append", type=int)
    parser.add_argument("--all-configs", action="store_true", help="every autotuning config")
    args = parser.parse_args(argv)
    if _common.interpreting():
        parser.error("unset TRITON_INTERPRET: the interpreter builds no GPU code")
    target = GPUTarget("cuda", args.arch, 32)
    for name in args.dtype or ["bfloat16"]:
        for d in args.head_dim or [64]:
            baseline_kernels(getattr(torch, name), d, target, args.all_configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
