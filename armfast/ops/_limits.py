"""What a backend's kernels take, declared once per backend (`Limits`): the device types and
dtypes, and the head dims. `armfast.ops` checks them when it resolves a backend (eager calls,
cached per kind of call) and the backend's custom ops check them in their bodies (the path
`torch.compile` and direct callers take), with the same errors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Optional

import torch

# the names the kernels, the auto table and the messages use
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.float64: "float64"}
ANY_DTYPE = tuple(DTYPE_NAMES)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype) or str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Limits:
    """dtypes: device type -> the dtypes the kernels take there (the device types it runs on);
    head_dims: the head dims of the attention-like ops (None: any)."""

    dtypes: Mapping[str, tuple[torch.dtype, ...]]
    head_dims: Optional[Collection[int]] = None

    def device_problem(self, device_type: str) -> Optional[str]:
        if device_type not in self.dtypes:
            return f"runs on {'/'.join(self.dtypes)} tensors, not {device_type}"
        return None

    def problems(self, backend: str, dtype: torch.dtype, device_type: str,
                 head_dim: Optional[int]) -> list[tuple[type, str]]:
        """(error type, message) for each limit a call of this dtype and head dim breaks on a
        device of `device_type` (whose own problem `device_problem` says)."""
        found = []
        dtypes = self.dtypes.get(device_type, ())
        if device_type in self.dtypes and dtype not in dtypes:
            names = ", ".join(dtype_name(d) for d in dtypes)
            found.append((TypeError, f"backend '{backend}' supports dtypes {names} on "
                                     f"{device_type}, got {dtype_name(dtype)}"))
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            dims = self.head_dims
            dims = f"{dims.start}..{dims.stop - 1}" if isinstance(dims, range) else tuple(dims)
            found.append((ValueError, f"backend '{backend}' supports head dims {dims}, got "
                                      f"d={head_dim}"))
        return found

    def check(self, backend: str, dtype: torch.dtype, device: torch.device,
              head_dim: Optional[int]) -> None:
        """Raises the first limit a call breaks (the custom ops' check)."""
        problem = self.device_problem(device.type)
        if problem is not None:
            raise ValueError(f"backend '{backend}' {problem}")
        for error, message in self.problems(backend, dtype, device.type, head_dim):
            raise error(message)

