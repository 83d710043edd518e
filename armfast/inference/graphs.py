"""CUDA graphs for inference calls whose time is launch latency: one graph per input shape.

At ViT-B/16 sizes a GPU runs each kernel of a crop batch in microseconds, so the host launching
~300 of them one after the other (CLIP's blocks, the baseline's last block, ARM's 29 kernels,
the logits) takes longer than the GPU does. `GraphedCall` captures ``fn`` into a
`torch.cuda.CUDAGraph` per input signature (shape, dtype, device, autocast state) and replays it:
the input is copied into the graph's static buffer and one launch runs everything.

Policy per signature: the first call runs eagerly (it warms up: Triton autotuning, cuBLAS
handles, lazily built constants); the second runs eagerly too, then captures ``fn`` on the same
input, replays it and compares the two results: a graph that disagrees (or fails to capture)
turns graphs off for this object, with a warning, and the eager path goes on. Later calls
replay. At most ``max_graphs`` graphs are kept (least recently used dropped), each with its own
memory pool.

What ``fn`` must do for this to be safe: no host synchronisation (``.item()``, ``.cpu()``,
printing a tensor, data-dependent shapes), allocations only through torch, and every tensor it
reads that is not made inside the call (weights, cached constants) alive for as long as the
graph is. The output is the graph's static buffer: read it before the next call.
Off the GPU, under autograd, or while another capture runs, `GraphedCall` is ``fn`` itself.
"""
from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

# max |graph - eager| / max |eager| accepted by the self-check: replays run the same kernels on
# the same input, so they agree unless the capture read memory it must not (then far apart)
CHECK_TOLERANCE = 1e-3


@dataclass
class Captured:
    """A captured call: replay after copying the new input into ``static_input``."""

    graph: object
    static_input: Tensor
    static_output: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output


def capture_cuda_graph(fn: Callable[[Tensor], Tensor], x: Tensor) -> Captured:
    """Captures ``fn`` on a copy of ``x`` into a CUDA graph (its own memory pool) and replays it
    once, so that ``static_output`` holds ``fn(x)``."""
    static_input = x.clone()
    graph = torch.cuda.CUDAGraph()
    # thread_local: a DataLoader's pin-memory thread may allocate pinned memory meanwhile
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_output = fn(static_input)
    graph.replay()
    return Captured(graph, static_input, static_output)


def relative_difference(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| in float64 (inf when a holds a non-finite value that b does not)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    bad = ~torch.isfinite(a) & torch.isfinite(b)
    if bool(bad.any()):
        return float("inf")
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-30) if b.numel() else 0.0


class GraphedCall:
    """``fn(x)`` replayed from CUDA graphs, one per signature of ``x`` (module docstring).

    ``capture`` is the capturing function (tests give a fake one to check the policy on CPU);
    ``enabled=False`` makes this object ``fn`` itself.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], *, max_graphs: int = 4, enabled: bool = True,
                 capture: Callable[[Callable, Tensor], Captured] = capture_cuda_graph,
                 device_types: tuple[str, ...] = ("cuda",)):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn, self.max_graphs, self.capture = fn, max_graphs, capture
        self.device_types = device_types
        self.disabled: Optional[str] = None if enabled else "disabled by the caller"
        self.graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self.calls: Counter = Counter()
        self.captures = 0

    def key(self, x: Tensor) -> tuple:
        device_type = x.device.type
        amp = torch.is_autocast_enabled(device_type)
        amp_dtype = torch.get_autocast_dtype(device_type) if amp else None
        return (tuple(x.shape), x.stride(), x.dtype, x.device, amp, amp_dtype)

    def active(self, x: Tensor) -> bool:
        return (self.disabled is None and x.device.type in self.device_types
                and not torch.is_grad_enabled() and not _capturing(x))

    def __call__(self, x: Tensor) -> Tensor:
        if not self.active(x):
            return self.fn(x)
        key = self.key(x)
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            return graph(x)
        self.calls[key] += 1
        eager = self.fn(x)
        if self.calls[key] >= 2:
            self._try_capture(key, x, eager)
        return eager

    def _try_capture(self, key: tuple, x: Tensor, eager: Tensor) -> None:
        try:
            graph = self.capture(self.fn, x)
        except Exception as exc:  # capture is an optimisation: fall back to eager, say why
            self._disable(f"capture failed ({type(exc).__name__}: {exc})")
            return
        difference = relative_difference(graph.static_output, eager)
        if not difference <= CHECK_TOLERANCE:
            self._disable(f"the replayed graph differs from the eager call by {difference:.3g} "
                          f"(relative), more than {CHECK_TOLERANCE:g}")
            return
        self.graphs[key] = graph
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        self.graphs.clear()
        warnings.warn(f"CUDA graphs turned off, running eagerly: {reason}", RuntimeWarning,
                      stacklevel=3)

    def reset(self) -> None:
        """Drops every graph (and its memory pool)."""
        self.graphs.clear()
        self.calls.clear()


def _capturing(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()
