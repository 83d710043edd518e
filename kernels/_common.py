"""Pieces shared by the Triton kernels: interpreter detection, accumulator dtypes, dot precision.

Triton decides at decoration time (`@triton.jit`) whether a kernel is compiled for the GPU or run
by the interpreter (``TRITON_INTERPRET=1``, numpy on the CPU), so each kernel module records
`INTERPRET = interpreting()` when it is imported, and that is the mode its kernels run in.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether `@triton.jit` would build interpreter kernels now."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads the environment there
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype: torch.dtype):
    """Accumulate in float32, or float64 for float64 inputs (interpreter, gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for float32 inputs, following torch's matmul setting: "highest"
    (torch's default) keeps full float32 products ("ieee"), "high"/"medium" allow TF32 tensor
    cores (`torch.backends.cuda.matmul.allow_tf32 = True` sets "high" too). Half-precision dots
    ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"
