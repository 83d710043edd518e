"""Peak extra memory of one call: the most bytes in live torch tensors that the call allocated
on top of what was allocated when it started (its outputs and saved tensors included).

- CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus ``memory_allocated`` at the
  start (tensor bytes, not the caching allocator's reserve).
- CPU: the same quantity, from the allocation and free events of torch's CPU allocator that
  the profiler records (``profile_memory=True``): their running sum, in time order, peaks at
  the answer. (tracemalloc cannot see torch's allocations; RSS counts freed pages the
  allocator keeps.) Returns None where the profiler gives no such events.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

METHOD = {
    "cuda": "torch.cuda.max_memory_allocated above the allocation at the start of the call",
    "cpu": "peak of torch's CPU allocations during the call, above the start, from the profiler's "
           "memory events",
}


def peak_memory(fn: Callable[[], object], device: str | torch.device) -> Optional[int]:
    """Peak extra bytes allocated by torch while `fn()` runs on `device` (see module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _peak_cuda(fn, device)
    if device.type == "cpu":
        return _peak_cpu(fn)
    return None


def _peak_cuda(fn, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    result = fn()  # kept alive until the peak is read: outputs count
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    del result
    return peak


# Kineto (torch's profiler library) logs every profiler start/stop ("USDT: ... profiler_start")
# and, without a GPU, "gpuGetDeviceCount failed" straight to the process's stderr. It reads this
# level once, when the profiler is first used; 6 is past its highest level. A user's own
# setting wins.
KINETO_LOG_LEVEL = ("KINETO_LOG_LEVEL", "6")


def _peak_cpu(fn) -> Optional[int]:
    import os

    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault(*KINETO_LOG_LEVEL)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    try:
        from torch.autograd import DeviceType

        events = prof.profiler.kineto_results.events()
        allocations = sorted((e.start_ns(), e.nbytes()) for e in events
                             if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    except (AttributeError, ImportError, RuntimeError):  # profiler internals moved: unknown, not 0
        return None
    if not allocations:  # every benchmarked call allocates its outputs: nothing was recorded
        return None
    current = peak = 0
    for _, nbytes in allocations:  # frees are negative
        current += nbytes
        peak = max(peak, current)
    return peak
