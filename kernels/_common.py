"""Pieces shared by the Triton kernels: interpreter detection, autotuning, accumulator dtypes.

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


class FixedConfig:
    """Launches a kernel with one config's meta-parameters: autotuning in the interpreter would
    run every config several times, which is far too slow there."""

    def __init__(self, kernel, config: triton.Config):
        self.fn, self.config = kernel, config

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            return launch(*args, **kwargs, **self.config.kwargs)
        return run


def autotune(configs: list[triton.Config], key: list[str], interpret_config: triton.Config):
    """`triton.autotune` on a GPU; `interpret_config` alone under the interpreter.

    Every kernel tuned here writes (never accumulates into) its outputs, so re-running it once per
    config while tuning leaves the same result and needs no `reset_to_zero`.
    """
    if interpreting():
        return lambda kernel: FixedConfig(kernel, interpret_config)
    return triton.autotune(configs=configs, key=key)


def bucket(n: int) -> int:
    """Autotuning key for a length: tune once per power of two, not once per length."""
    return triton.next_power_of_2(n)


def acc_dtype(dtype: torch.dtype):
    """Accumulate in float32, or float64 for float64 inputs (interpreter, gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for float32 inputs, following torch's matmul setting: "highest"
    (torch's default) keeps full float32 products, "high"/"medium" allow TF32 tensor cores.
    Half-precision dots ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"
