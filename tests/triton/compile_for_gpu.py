"""Compiles the Triton kernels for a GPU target without a GPU (Triton ships ptxas).

The interpreter runs the kernels' Python, not Triton's compiler, so it misses what only GPU
compilation checks (constexpr globals, dot shapes and dtypes, layouts). Run with
TRITON_INTERPRET unset or 0:

    python tests/triton/compile_for_gpu.py [--arch 90] [--dtype float16 ...] [--head-dim 40 ...]
                                           [--all-configs]

Prints each kernel's shared memory; exits non-zero on the first compilation error.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from armfast.kernels import _common
from armfast.kernels import attention as attn
from armfast.kernels import patch_text_logits as ptl

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _compile(kernel, pointers: dict, constexprs: dict, config: triton.Config, target: GPUTarget,
             floats=("sm_scale",)):
    jit = kernel if isinstance(kernel, triton.runtime.jit.JITFunction) else kernel.fn
    constexprs = {**constexprs, **config.kwargs}
    signature = {name: ("constexpr" if name in constexprs else
                        "*" + pointers[name] if name in pointers else
                        "fp32" if name in floats else "i32")
                 for name in jit.arg_names}
    start = time.time()
    compiled = triton.compile(ASTSource(jit, signature, constexprs), target=target,
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    print(f"{jit.__name__:<20} {str(config.kwargs):<48} warps={config.num_warps} "
          f"stages={config.num_stages} smem={compiled.metadata.shared:>7} ({time.time() - start:.1f}s)",
          flush=True)


def _configs(kernel, all_configs):
    configs = getattr(kernel, "configs", None)
    return configs if all_configs else configs[:1]


def attention_kernels(dtype, d, target, all_configs):
    t, acc = TYPES[dtype], "fp32"
    precision = "tf32" if dtype == torch.float32 else "ieee"
    common = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                  ACC_DTYPE=_common.acc_dtype(dtype))
    print(f"attention {t} d={d}")
    _compile(attn.attn_bwd_preprocess, dict(O=t, DO=t, DELTA=acc), common,
             triton.Config({"BLOCK_M": attn.BLOCK_M_PREPROCESS}), target)
    common["DOT_PRECISION"] = precision
    for kernel, pointers in (
            (attn.attn_fwd, dict(Q=t, K=t, V=t, O=t, LSE=acc)),
            (attn.attn_bwd_dkdv, dict(Q=t, K=t, V=t, DO=t, LSE=acc, DELTA=acc, DK=t, DV=t)),
            (attn.attn_bwd_dq, dict(Q=t, K=t, V=t, DO=t, LSE=acc, DELTA=acc, DQ=t))):
        for config in _configs(kernel, all_configs):
            _compile(kernel, pointers, common, config, target)


def patch_text_logits_kernels(dtype, target, all_configs):
    t, acc = TYPES[dtype], "fp32"
    common = dict(ACC_DTYPE=_common.acc_dtype(dtype))
    print(f"patch_text_logits {t}")
    _compile(ptl.row_norm, dict(X=t, NORM=acc), common,
             triton.Config({"BLOCK_R": ptl.ROW_NORM_BLOCK_R, "BLOCK_E": ptl.ROW_NORM_BLOCK_E}), target)
    common["DOT_PRECISION"] = "tf32" if dtype == torch.float32 else "ieee"
    norms = dict(SCALE="fp32", X_NORM=acc, T_NORM=acc)
    for kernel, pointers in (
            (ptl.ptl_fwd, dict(X=t, T=t, SCALE="fp32", OUT=t)),
            (ptl.ptl_bwd_gcos, dict(X=t, T=t, DOUT=t, GCOS=acc)),
            (ptl.ptl_bwd_dx, dict(X=t, T=t, DOUT=t, GC_ROW=acc, DX=t, **norms)),
            (ptl.ptl_bwd_dtext, dict(X=t, T=t, DOUT=t, GC_COL=acc, DT=t, **norms))):
        for config in _configs(kernel, all_configs):
            _compile(kernel, pointers, common, config, target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--dtype", action="append", choices=[str(d)[6:] for d in TYPES])
    parser.add_argument("--head-dim", action="append", type=int)
    parser.add_argument("--all-configs", action="store_true", help="every autotuning config")
    parser.add_argument("--skip-logits", action="store_true")
    args = parser.parse_args(argv)
    if _common.interpreting():
        parser.error("unset TRITON_INTERPRET: the interpreter builds no GPU code")
    target = GPUTarget("cuda", args.arch, 32)
    for name in args.dtype or ["float16"]:
        dtype = getattr(torch, name)
        for d in args.head_dim or [40]:
            attention_kernels(dtype, d, target, args.all_configs)
        if not args.skip_logits:
            patch_text_logits_kernels(dtype, target, args.all_configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
