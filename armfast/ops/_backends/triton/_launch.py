"""What every Triton launcher of the backend shares: the kernel modules' common parts, made at the
first launch, the device guard, the flat grid and its CUDA limit, and the tuner's call.

The kernel modules are imported at the first launch, not when the backend loads: whether they
are compiled for the GPU or run by the interpreter is fixed when they are imported, and
`TRITON_INTERPRET=1` set after `import armfast` but before the first call still counts.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from types import SimpleNamespace

import torch
import triton
from torch import Tensor

# CUDA launches at most 2**31 - 1 programs along grid axis 0 (65535 along axes 1 and 2); every
# kernel here runs on a flat axis-0 grid and decodes (batch * head, tile) itself.
MAX_PROGRAMS = 2**31 - 1


@functools.cache
def shared() -> SimpleNamespace:
    """`armfast.kernels._common` and `_tuning`, imported at the first launch."""
    from armfast.kernels import _common, _tuning
    return SimpleNamespace(common=_common, tuning=_tuning)


def interpret_mode() -> bool:
    """Whether the kernels run (or, once imported, will run) under the Triton interpreter."""
    attention = sys.modules.get("armfast.kernels.attention")
    if attention is not None:
        return attention.INTERPRET
    from armfast.kernels._common import interpreting
    return interpreting()


_SAME_DEVICE = contextlib.nullcontext()


def on_device(t: Tensor):
    """Triton launches on the current CUDA device; make it the tensor's one (switching only when
    it differs: a device guard costs microseconds)."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _SAME_DEVICE


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def kind(dtype: torch.dtype, precision: str) -> str:
    """Which config list applies: tensor-core half precision, TF32, or plain float32 FMAs."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "tf32" if precision == "tf32" else "fp32"


def flat_grid(units: int, length: int, block: int, what: str, *tensors: Tensor) -> tuple[int]:
    """(units * tiles of `block` over `length`,): the flat grid of one program per (unit, tile),
    checked against CUDA's limit so that an oversized launch fails here with a ValueError naming
    the op (`what`, its "{}" filled with the shapes of `tensors`), not in the driver as "invalid
    argument". The message is formatted only then: the launch path builds nothing per call."""
    programs = units * ((length + block - 1) // block)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{what.format(*(tuple(t.shape) for t in tensors))} needs {programs} "
                         f"programs on launch grid axis 0, expected at most {MAX_PROGRAMS} "
                         "(CUDA's limit)")
    return (programs,)


def grid_2d(units: int, length: int, block: int, what: str, *tensors: Tensor) -> tuple[int, int]:
    """(units, tiles of `block` over `length`): the 2-D grid of the forward-only kernels, checked
    against CUDA's limits as `flat_grid` does."""
    tiles = (length + block - 1) // block
    if units > MAX_PROGRAMS or tiles > 65535:
        raise ValueError(f"{what.format(*(tuple(t.shape) for t in tensors))} needs a launch grid "
                         f"of {units} x {tiles} programs, expected at most {MAX_PROGRAMS} x 65535 "
                         "(CUDA's limits)")
    return units, tiles


def tune(tuner, key, constexprs: dict, configs, config_args: tuple, interpret_config, device,
         run):
    """The config of `key`, chosen now (a miss of `tuner.best`) among
    `configs(family, *config_args)` for the device's GPU family."""
    return tuner.tune(key, constexprs, lambda family: configs(family, *config_args),
                      interpret_config, device, run)


def attention_constexprs(q: Tensor, precision: str, **extra) -> dict:
    """The compile-time arguments the attention-like kernels (attention, self-correlation) take
    for `q` (besides tile sizes)."""
    d = q.shape[-1]
    return {"HEAD_DIM": d, "BLOCK_D": block_d(d),
            "ACC_DTYPE": shared().common.acc_dtype(q.dtype), "DOT_PRECISION": precision,
            **extra}
