"""Wall-clock timing of one callable, the same protocol for `armfast bench` and pytest-benchmark.

A measurement is a number of rounds; a round is ``calls`` back-to-back calls between two reads
of a clock that first waits for the device (`device_clock`). The device is thus synchronised
once per round, not per call, so a GPU keeps its queue full as it does in real use, and the
per-call time of a round is its duration / ``calls``. ``calls`` is chosen so that a round lasts
at least ``min_round_s`` (short calls are below the clock's and the launch path's resolution
otherwise). The reported time is the median over rounds.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TimerConfig:
    min_round_s: float  # calls per round are chosen so a round lasts at least this long
    rounds: int  # rounds to time, fewer when they would take more than max_total_s
    max_total_s: float  # budget for the timed rounds of one measurement
    warmup: int = 1  # untimed calls first: allocator caches, Triton compilation, lazy init

    def __post_init__(self):
        if self.min_round_s < 0 or self.max_total_s <= 0:
            raise ValueError(f"min_round_s must be >= 0 and max_total_s > 0; got {self}")
        if self.rounds < 1 or self.warmup < 0:
            raise ValueError(f"rounds must be >= 1 and warmup >= 0; got {self}")


FULL = TimerConfig(min_round_s=0.05, rounds=15, max_total_s=3.0)
QUICK = TimerConfig(min_round_s=0.01, rounds=5, max_total_s=0.5)


def synchronize(device: str | torch.device) -> None:
    """Waits for all work queued on `device`; a no-op on CPU, where calls are synchronous."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_clock(device: str | torch.device) -> Callable[[], float]:
    """A ``time.perf_counter`` that first synchronises `device` (pytest-benchmark's timer too)."""
    device = torch.device(device)
    if device.type == "cpu":
        return time.perf_counter

    def clock() -> float:
        synchronize(device)
        return time.perf_counter()

    clock.__name__ = f"perf_counter_synchronized_{device.type}"
    return clock


@dataclass(frozen=True)
class Plan:
    """How to time a callable: ``rounds`` rounds of ``calls`` calls. ``single_call_s`` are the
    calibration calls (after warm-up), each timed alone."""

    calls: int
    rounds: int
    single_call_s: tuple[float, ...]


@dataclass(frozen=True)
class Timing:
    per_call_s: tuple[float, ...]  # one entry per round: round duration / calls
    calls: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_call_s)

    @property
    def rounds(self) -> int:
        return len(self.per_call_s)

    def to_dict(self) -> dict:
        return {"median_s": self.median_s, "min_s": min(self.per_call_s),
                "max_s": max(self.per_call_s), "rounds": self.rounds, "calls_per_round": self.calls}


def plan(fn: Callable[[], object], device: str | torch.device, config: TimerConfig) -> Plan:
    """Warms `fn` up, times up to three single calls and decides calls per round and rounds.
    The median of the single calls sets the plan, so one call slowed down by another process
    does not turn a millisecond case into a single-round measurement."""
    clock = device_clock(device)
    for _ in range(config.warmup):
        fn()
    singles: list[float] = []
    while len(singles) < 3 and (not singles or sum(singles) < config.max_total_s / 2):
        start = clock()
        fn()
        singles.append(max(clock() - start, 1e-9))
    per_call = statistics.median(singles)
    calls = max(1, math.ceil(config.min_round_s / per_call))
    rounds = max(1, min(config.rounds, int(config.max_total_s / (calls * per_call))))
    return Plan(calls=calls, rounds=rounds, single_call_s=tuple(singles))


def time_rounds(fn: Callable[[], object], device: str | torch.device, calls: int,
                rounds: int) -> list[float]:
    """Per-call seconds of each of `rounds` rounds of `calls` calls."""
    clock = device_clock(device)
    times = []
    for _ in range(rounds):
        start = clock()
        for _ in range(calls):
            fn()
        times.append((clock() - start) / calls)
    return times


def measure(fn: Callable[[], object], device: str | torch.device,
            config: TimerConfig = FULL) -> Timing:
    """Median per-call time of `fn` on `device` (see the module docstring for the protocol)."""
    p = plan(fn, device, config)
    # Single-call rounds are exactly what the calibration calls were: keep them, which halves
    # the cost of cases that take seconds per call (a large batch on a CPU).
    times = list(p.single_call_s[:p.rounds]) if p.calls == 1 else []
    times += time_rounds(fn, device, p.calls, p.rounds - len(times))
    return Timing(per_call_s=tuple(times), calls=p.calls)
