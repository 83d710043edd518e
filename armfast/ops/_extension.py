"""`cpu` and `cuda` backends: the compiled kernels of armfast._C (C++/OpenMP) and armfast._C_cuda.

Each module is imported on first use and on its own, so a missing or broken CUDA build, or a
machine without a driver, only makes the `cuda` backend unavailable (the reason shows in
`backend_status`) and never breaks `import armfast` or the `cpu` backend.

The kernels never see libtorch: the wrappers here check what the kernels rely on (device, dtype,
head dim), allocate the outputs and pass each tensor as ``(data_ptr, sizes, strides)`` with
strides in elements, plus, for CUDA, the device index and torch's current stream.

The CUDA attention runs on tensor cores (FlashAttention-2 style, mma.sync) for float16 and
bfloat16, and for float32 on TF32 when torch allows TF32 matmuls
(`torch.backends.cuda.matmul.allow_tf32`, i.e. `torch.get_float32_matmul_precision() != "highest"`);
otherwise float32 runs on exact FP32 kernels. The backward accumulates dQ with fp32 atomics unless
`torch.are_deterministic_algorithms_enabled()`, which selects bitwise-reproducible kernels. Tiles
are picked per call from the GPU's shared memory and SM count; ARMFAST_CUDA_MAX_SHARED_MEMORY
(bytes) lowers the shared-memory limit, e.g. to run the small-memory tiles on any GPU.

The baseline attentions (self_correlation, self_correlation_sum, gaussian_self_correlation,
masked_affinity_attention) are forward kernels (their gradients recompute the reference math):
flash-style tiles on the CPU, tensor cores on CUDA for float16/bfloat16 and, when torch allows
TF32, float32 (at precision 'highest' the cuda backend refuses float32 for them).
"""
from __future__ import annotations

import functools
import importlib
import re
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from ._library import (affinity_first_pass, baseline_ops, define_attention, define_patch_text_logits,
                       empty, lse_dtype)
from ._reference import (GAUSSIAN_SELF_CORRELATION, MASKED_AFFINITY, SELF_CORRELATION,
                         SELF_CORRELATION_SUM)
from ._registry import Backend

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_HEAD_DIMS = (32, 64, 128)


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


# ---------------------------------------------------------------------------------------------
# loading and availability
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _import(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    """(module, None), or (None, why armfast.<name> cannot be imported)."""
    try:
        return importlib.import_module(f"armfast.{name}"), None
    except Exception as exc:  # ImportError, or an OSError/undefined symbol from a broken build
        return None, (f"armfast.{name} failed to import ({type(exc).__name__}: {exc}); "
                      f"reinstall armfast so that the extension is compiled")


def _module(name: str) -> ModuleType:
    module, reason = _import(name)
    if module is None:
        raise RuntimeError(reason)
    return module


def _cpu_runtime_check(device: torch.device) -> Optional[str]:
    return _import("_C")[1]


@functools.lru_cache(maxsize=None)
def _cuda_devices() -> tuple[int, Optional[str]]:
    """(number of devices armfast._C_cuda sees, None), or (0, why it sees none)."""
    module, reason = _import("_C_cuda")
    if module is None:
        return 0, reason
    try:
        count = module.device_count()
    except RuntimeError as exc:  # no driver, driver too old for the runtime, ...
        return 0, f"the CUDA driver cannot be used by armfast._C_cuda ({exc})"
    if count == 0:
        return 0, "no CUDA device is visible"
    return count, None


def _arch_runs(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether code built for `arch_list` ("8.0;9.0a;10.0f;9.0+PTX", the syntax setup.py takes)
    runs on a GPU of `capability`, by nvcc's compatibility rules."""
    for item in filter(None, re.split(r"[;,\s]+", arch_list)):
        ptx = item.endswith("+PTX")
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", item[:-4] if ptx else item)
        if m is None:
            continue
        built, suffix = (int(m[1]), int(m[2])), m[3]
        same_family = capability[0] == built[0] and capability[1] >= built[1]
        if suffix == "a":
            runs = capability == built  # arch-specific: that exact GPU only, PTX included
        elif suffix == "f":
            runs = same_family  # family-specific: same major, this minor or newer, PTX included
        elif ptx:
            runs = capability >= built  # the driver compiles plain PTX for any newer GPU
        else:
            runs = same_family  # a cubin runs on later minor versions of its major
        if runs:
            return True
    return False


def _cuda_runtime_check(device: torch.device) -> Optional[str]:
    count, reason = _cuda_devices()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "torch.cuda is not available (a CPU-only torch build, or no usable driver)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= count:
        return f"cuda:{index} does not exist (armfast._C_cuda sees {count} device(s))"
    capability = torch.cuda.get_device_capability(index)
    archs = _module("_C_cuda").build_info()["cuda_archs"]
    if not _arch_runs(archs, capability):
        return (f"armfast._C_cuda was built for {archs}, which cannot run on cuda:{index} "
                f"(compute capability {capability[0]}.{capability[1]}); rebuild with "
                f"ARMFAST_CUDA_ARCH_LIST=\"{capability[0]}.{capability[1]}\" (8.0 or newer)")
    return None


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------

def _arg(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return t.data_ptr(), t.shape, t.stride()


def _check(backend: str, dtypes: tuple[torch.dtype, ...], **tensors: Tensor) -> None:
    """The kernels read raw memory: every tensor must be on the backend's device type and share
    the first tensor's dtype and device."""
    first_name, first = next(iter(tensors.items()))
    if first.dtype not in dtypes:
        names = ", ".join(_DTYPE_NAMES[d] for d in dtypes)
        raise TypeError(f"backend '{backend}' takes {names} tensors; {first_name} is {first.dtype}")
    for name, t in tensors.items():
        if t.device.type != backend:
            raise ValueError(f"backend '{backend}' needs {name} on a {backend} device, got {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} must be on the device of {first_name} ({first.device}), got {t.device}")


def _check_lse(lse: Tensor, q: Tensor) -> None:
    if lse.dtype != lse_dtype(q.dtype) or lse.device != q.device:
        raise TypeError(f"lse must be {lse_dtype(q.dtype)} on {q.device}, got {lse.dtype} on {lse.device}")


def _check_head_dim(d: int) -> None:
    if d not in CUDA_HEAD_DIMS:
        raise ValueError(f"backend 'cuda' supports head dims {CUDA_HEAD_DIMS}, got d={d}")


# ---------------------------------------------------------------------------------------------
# cpu
# ---------------------------------------------------------------------------------------------

def cpu_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> Tensor:
    lse = empty(q.shape[:3], lse_dtype(q.dtype), q.device)
    _module("_C").attention_forward(_DTYPE_NAMES[q.dtype], _arg(q), _arg(k), _arg(v), _arg(out),
                                    _arg(lse), scale, torch.get_num_threads())
    return lse


def cpu_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           scale: float) -> tuple[Tensor, Tensor, Tensor]:
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    _module("_C").attention_backward(
        _DTYPE_NAMES[q.dtype], _arg(dout), _arg(q), _arg(k), _arg(v), _arg(out), _arg(lse),
        _arg(dq), _arg(dk), _arg(dv), scale, torch.get_num_threads())
    return dq, dk, dv


def cpu_patch_text_logits_forward(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    out = empty((x.shape[0], x.shape[1], text.shape[0]), x.dtype, x.device)
    _module("_C").patch_text_logits_forward(_DTYPE_NAMES[x.dtype], _arg(x), _arg(text), _arg(out),
                                            float(logit_scale), torch.get_num_threads())
    return out


def cpu_patch_text_logits_backward(dout: Tensor, x: Tensor, text: Tensor, logit_scale: Tensor,
                                   text_grad: bool = True) -> tuple[Tensor, Optional[Tensor], Tensor]:
    dx = empty(x.shape, x.dtype, x.device)
    dtext = empty(text.shape, text.dtype, text.device) if text_grad else None
    dscale = _module("_C").patch_text_logits_backward(
        _DTYPE_NAMES[x.dtype], _arg(dout), _arg(x), _arg(text), float(logit_scale), _arg(dx),
        None if dtext is None else _arg(dtext), torch.get_num_threads())
    return dx, dtext, torch.full(logit_scale.shape, dscale, dtype=logit_scale.dtype,
                                 device=logit_scale.device)


# The baseline attentions (forward only; see `_library.ForwardOnlyOp` for the contract).

def cpu_self_correlation_forward(x: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    _module("_C").self_correlation_forward(_DTYPE_NAMES[x.dtype], _arg(x), None, _arg(v), _arg(out),
                                           scale, None, torch.get_num_threads())


def cpu_self_correlation_sum_forward(q: Tensor, k: Tensor, v: Tensor, scale: float,
                                     out: Tensor) -> None:
    _module("_C").self_correlation_forward(_DTYPE_NAMES[q.dtype], _arg(q), _arg(k), _arg(v),
                                           _arg(out), scale, None, torch.get_num_threads())


def cpu_gaussian_self_correlation_forward(x: Tensor, v: Tensor, scale: float, grid_h: int,
                                          grid_w: int, sigma: float, class_token: bool,
                                          out: Tensor) -> None:
    _module("_C").self_correlation_forward(_DTYPE_NAMES[x.dtype], _arg(x), None, _arg(v), _arg(out),
                                           scale, (grid_h, grid_w, class_token, sigma),
                                           torch.get_num_threads())


def cpu_masked_affinity_forward(f: Tensor, v: Tensor, beta: float, gamma: float, out: Tensor) -> None:
    _module("_C").masked_affinity_forward(_DTYPE_NAMES[f.dtype], _arg(f), _arg(v), _arg(out), beta,
                                          gamma, torch.get_num_threads())


# ---------------------------------------------------------------------------------------------
# cuda
# ---------------------------------------------------------------------------------------------

def _launch(t: Tensor) -> tuple[int, int]:
    """(device index, handle of torch's current stream on it): the kernels run there, in order
    with torch's own work."""
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def _allow_tf32(dtype: torch.dtype) -> bool:
    """float32 may run on TF32 tensor cores: torch allows TF32 for float32 matmuls."""
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def cuda_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> Tensor:
    """Writes out ([B, H, Nq, d], any strides, e.g. a view of a [B, Nq, H, d] buffer); returns lse."""
    _check("cuda", CUDA_DTYPES, q=q, k=k, v=v)
    _check_head_dim(q.shape[-1])
    lse = empty(q.shape[:3], torch.float32, q.device)
    _module("_C_cuda").attention_forward(_DTYPE_NAMES[q.dtype], _arg(q), _arg(k), _arg(v),
                                         _arg(out), _arg(lse), float(scale),
                                         _allow_tf32(q.dtype), *_launch(q))
    return lse


def cuda_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                            scale: float) -> tuple[Tensor, Tensor, Tensor]:
    _check("cuda", CUDA_DTYPES, q=q, k=k, v=v, dout=dout, out=out)
    _check_lse(lse, q)
    _check_head_dim(q.shape[-1])
    module = _module("_C_cuda")
    B, H, Nq, d = q.shape
    tf32 = _allow_tf32(q.dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    atomic_dq = not deterministic and (q.dtype != torch.float32 or tf32)
    workspace = empty((module.attention_backward_workspace(B, H, Nq, d, atomic_dq),),
                      torch.float32, q.device)
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    module.attention_backward(
        _DTYPE_NAMES[q.dtype], _arg(dout), _arg(q), _arg(k), _arg(v), _arg(out), _arg(lse),
        _arg(workspace), _arg(dq), _arg(dk), _arg(dv), float(scale), tf32, deterministic,
        *_launch(q))
    return dq, dk, dv


def _cuda_logit_scale(logit_scale: Tensor, x: Tensor) -> Tensor:
    if logit_scale.device != x.device:
        raise ValueError(f"logit_scale must be on x's device ({x.device}), got {logit_scale.device}")
    return logit_scale.detach().to(torch.float32).reshape(1).contiguous()


def cuda_patch_text_logits_forward(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    _check("cuda", CUDA_DTYPES, x=x, text=text)
    module = _module("_C_cuda")
    B, N, E = x.shape
    C = text.shape[0]
    scale = _cuda_logit_scale(logit_scale, x)
    out = empty((B, N, C), x.dtype, x.device)
    workspace = empty((module.patch_text_logits_workspace(B * N, C, E, False),), torch.float32,
                       x.device)
    module.patch_text_logits_forward(_DTYPE_NAMES[x.dtype], _arg(x), _arg(text), _arg(scale),
                                     _arg(out), _arg(workspace), _allow_tf32(x.dtype), *_launch(x))
    return out


def cuda_patch_text_logits_backward(dout: Tensor, x: Tensor, text: Tensor, logit_scale: Tensor,
                                    text_grad: bool = True) -> tuple[Tensor, Optional[Tensor], Tensor]:
    _check("cuda", CUDA_DTYPES, x=x, text=text, dout=dout)
    module = _module("_C_cuda")
    B, N, E = x.shape
    C = text.shape[0]
    scale = _cuda_logit_scale(logit_scale, x)
    dx = empty(x.shape, x.dtype, x.device)
    dtext = empty(text.shape, text.dtype, text.device) if text_grad else None
    dscale = empty((1,), torch.float32, x.device)
    workspace = empty((module.patch_text_logits_workspace(B * N, C, E, True),), torch.float32,
                       x.device)
    module.patch_text_logits_backward(
        _DTYPE_NAMES[x.dtype], _arg(dout), _arg(x), _arg(text), _arg(scale), _arg(dx),
        None if dtext is None else _arg(dtext), _arg(dscale), _arg(workspace),
        _allow_tf32(x.dtype), *_launch(x))
    return dx, dtext, dscale.to(logit_scale.dtype).reshape(logit_scale.shape)


# The baseline attentions, forward only, on tensor cores: float32 only as TF32.

def _cuda_baseline_check(op: str, **tensors: Tensor) -> None:
    _check("cuda", CUDA_DTYPES, **tensors)
    if next(iter(tensors.values())).dtype == torch.float32 and not _allow_tf32(torch.float32):
        raise TypeError(f"backend 'cuda' runs {op} in float32 on TF32 tensor cores only, which torch's "
                        f"float32 matmul precision 'highest' forbids: use float16/bfloat16, "
                        f"torch.set_float32_matmul_precision('high'), or backend='triton'/'sdpa'")


def _cuda_self_correlation(op, x, x2, v, out, scale, grid) -> None:
    _cuda_baseline_check(op, x=x, v=v)
    _check_head_dim(x.shape[-1])
    _module("_C_cuda").self_correlation_forward(
        _DTYPE_NAMES[x.dtype], _arg(x), None if x2 is None else _arg(x2), _arg(v), _arg(out), float(scale),
        grid, _allow_tf32(x.dtype), *_launch(x))


def cuda_self_correlation_forward(x: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    _cuda_self_correlation("self_correlation", x, None, v, out, scale, None)


def cuda_self_correlation_sum_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor) -> None:
    _cuda_self_correlation("self_correlation_sum", q, k, v, out, scale, None)


def cuda_gaussian_self_correlation_forward(x: Tensor, v: Tensor, scale: float, grid_h: int, grid_w: int,
                                           sigma: float, class_token: bool, out: Tensor) -> None:
    _cuda_self_correlation("gaussian_self_correlation", x, None, v, out, scale,
                           (grid_h, grid_w, class_token, sigma))


def cuda_masked_affinity_forward(f: Tensor, v: Tensor, beta: float, gamma: float, out: Tensor) -> None:
    _cuda_baseline_check("masked_affinity_attention", f=f, v=v)
    rnorm, thresh = affinity_first_pass(f, beta)
    _module("_C_cuda").masked_affinity_forward(
        _DTYPE_NAMES[f.dtype], _arg(f), _arg(rnorm), _arg(thresh), _arg(v), _arg(out), float(gamma),
        _allow_tf32(f.dtype), *_launch(f))


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------

CPU_BACKEND = Backend(
    name="cpu",
    ops={"attention": define_attention("cpu", cpu_attention_forward, cpu_attention_backward,
                                       device_types="cpu"),
         "patch_text_logits": define_patch_text_logits(
             "cpu", cpu_patch_text_logits_forward, cpu_patch_text_logits_backward,
             device_types="cpu"),
         **baseline_ops("cpu", {SELF_CORRELATION: cpu_self_correlation_forward,
                                SELF_CORRELATION_SUM: cpu_self_correlation_sum_forward,
                                GAUSSIAN_SELF_CORRELATION: cpu_gaussian_self_correlation_forward,
                                MASKED_AFFINITY: cpu_masked_affinity_forward}, "cpu")},
    dtypes={"cpu": CPU_DTYPES},
    runtime_check=_cpu_runtime_check,
)

CUDA_BACKEND = Backend(
    name="cuda",
    ops={"attention": define_attention("cuda", cuda_attention_forward, cuda_attention_backward,
                                       device_types="cuda"),
         "patch_text_logits": define_patch_text_logits(
             "cuda", cuda_patch_text_logits_forward, cuda_patch_text_logits_backward,
             device_types="cuda"),
         **baseline_ops("cuda", {SELF_CORRELATION: cuda_self_correlation_forward,
                                 SELF_CORRELATION_SUM: cuda_self_correlation_sum_forward,
                                 GAUSSIAN_SELF_CORRELATION: cuda_gaussian_self_correlation_forward,
                                 MASKED_AFFINITY: cuda_masked_affinity_forward}, "cuda")},
    dtypes={"cuda": CUDA_DTYPES},
    head_dims=CUDA_HEAD_DIMS,
    runtime_check=_cuda_runtime_check,
)
