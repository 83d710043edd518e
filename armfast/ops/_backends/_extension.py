"""The compiled extension, shared by the `cpu` and `cuda` backends: importing its modules
(armfast._C, C++/OpenMP; armfast._C_cuda) and the argument convention of their kernels.

Each module is imported on first use and on its own, so a missing or broken CUDA build, or a
machine without a driver, only makes the `cuda` backend unavailable (the reason shows in
`backend_status`) and never breaks `import armfast` or the `cpu` backend.

The kernels never see libtorch: the backends pass each tensor as ``(data_ptr, sizes, strides)``
with strides in elements (`arg`), its dtype by name (`_limits.DTYPE_NAMES`), plus, for CUDA, the device
index and torch's current stream. What the kernels rely on (device, dtype, head dim) is checked
before they run: the op layer's validation and the backend's `Limits`.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

from torch import Tensor


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    """(module, None), or (None, why armfast.<name> cannot be imported)."""
    try:
        return importlib.import_module(f"armfast.{name}"), None
    except Exception as exc:  # ImportError, or an OSError/undefined symbol from a broken build
        return None, (f"armfast.{name} failed to import ({type(exc).__name__}: {exc}); "
                      f"reinstall armfast so that the extension is compiled")


def module(name: str) -> ModuleType:
    module, reason = load(name)
    if module is None:
        raise RuntimeError(reason)
    return module


def arg(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """A tensor as the kernels take it: (data pointer, sizes, strides in elements)."""
    return t.data_ptr(), t.shape, t.stride()
