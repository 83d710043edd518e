"""Learning-rate schedule: linear warm-up, then cosine decay to `min_ratio` of the peak."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, *, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable lambda for LambdaLR (a bound closure would not survive state_dict round trips)."""

    def __init__(self, total: int, warmup: int, min_ratio: float = 0.0):
        if total < 1:
            raise ValueError(f"total steps must be >= 1, got {total}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, total=self.total, warmup=self.warmup, min_ratio=self.min_ratio)


def build_scheduler(optimizer, *, total: int, warmup: int, min_ratio: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup, min_ratio))


def scheduler_state(scheduler) -> dict:
    """JSON-safe state of a LambdaLR (its lambdas are rebuilt from the config, not saved)."""
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def load_scheduler_state(scheduler, state: dict) -> None:
    state = dict(state)
    state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(state)
