"""Running a call with torch's (and so the CPU kernels') thread count set, then restored."""
from __future__ import annotations

import torch


def with_threads(threads: int, fn):
    """fn() with torch.get_num_threads() == threads, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)
