"""ProxyCLIP inputs whose mask a half-precision affinity would get wrong, shared by the CPU, Triton
and CUDA tests of masked_affinity_attention's exactness (tests/ops/test_affinity_exact.py,
tests/triton/test_triton_affinity_exact.py).

masked_affinity_attention keeps S_ij >= beta mean(S): a discrete decision. Each case puts many
affinities within half-precision rounding of the threshold, so a backend that rounds S or its
mean to bfloat16 flips some of them (each flip moves its row's output by about 1 / sqrt(kept
keys), far beyond the tolerance), while float32 decides every one as float64 does:

  centred        features ~ N(0, 1): mean(S) ~ 1 / n, half the pairs kept, dense at the threshold
  positive_mean  N(0, 1) + 0.5, as a VFM's features (mean cosine 0.2, about 10% kept)
  near_threshold binary rows of equal weight: S_ij = overlap / weight sits on a grid of step
                 1 / weight near 0.75, beta puts the threshold midway between two grid points:
                 every affinity is >= 8.7e-4 from it (float32 errs by ~1e-7, bfloat16 by 2e-3)

In the first two, beta = 1.2 is moved by at most 0.01 / mean(S) into the widest gap between the
affinities nearby, so that no pair sits within float32 rounding of the threshold (float32 and
float64 may decide such a tie differently: unavoidable, and not the mistake looked for).

Built in float64 on the CPU from a generator, then moved to the device and dtype asked for; the
oracle is `masked_affinity_f64` of the returned (rounded) tensors.
"""
from __future__ import annotations

import torch

CASES = ("centred", "positive_mean", "near_threshold")
GAMMA = 3.0  # ProxyCLIP's
BETA = 1.2
WEIGHT_FRACTION = 0.75  # near_threshold: ones per row / C


def _binary_rows(n: int, C: int, generator: torch.Generator) -> torch.Tensor:
    """[n, C] float64 rows with exactly round(0.75 C) ones each, at random places."""
    ones = max(1, round(WEIGHT_FRACTION * C))
    places = torch.rand(n, C, dtype=torch.float64, generator=generator).argsort(dim=1)[:, :ones]
    return torch.zeros(n, C, dtype=torch.float64).scatter_(1, places, 1.0)


def _midway_beta(f0: torch.Tensor) -> float:
    """beta putting beta mean(S) midway between the two grid points of S = overlap / weight
    around the median off-diagonal affinity (f0: one image's binary rows)."""
    weight = float(f0[0].sum())
    overlap = f0 @ f0.t()
    n = overlap.shape[0]
    off = overlap[~torch.eye(n, dtype=torch.bool)]
    level = float(off.median()) if off.numel() else weight - 1
    return (level + 0.5) / weight / float((overlap / weight).mean())


def _clear_beta(f0: torch.Tensor, beta: float, window: float = 0.01) -> float:
    """beta moved (by < window / mean(S)) so that beta mean(S) lies midway in the widest gap
    between one image's affinities within `window` of where it was: no pair is then so close
    to the threshold that float32 rounding could decide it either way (f0 [n, C] float64)."""
    n = f0.shape[0]
    fn = f0 / f0.norm(dim=-1, keepdim=True)
    s = fn @ fn.t()
    mean = float(s.mean())
    values = s[~torch.eye(n, dtype=torch.bool)].sort().values
    if values.numel() < 2:
        return beta
    mids, gaps = (values[1:] + values[:-1]) / 2, values[1:] - values[:-1]
    near = (mids - beta * mean).abs() <= window
    if near.any():
        mids, gaps = mids[near], gaps[near]
    return float(mids[gaps.argmax()]) / mean


def affinity_case(case: str, B: int, n: int, C: int, H: int, d: int, *, dtype=torch.float32,
                  device="cpu", generator=None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(f [B, n, C], v [B, H, n, d], beta, gamma) of `case` (one of CASES). The images are one
    image's rows in other orders (same affinities and mean, so one beta serves every image),
    and beta keeps the threshold clear of the affinities of f as rounded to `dtype`."""
    if case == "near_threshold":
        f0 = _binary_rows(n, C, generator)
        beta = _midway_beta(f0)
    elif case in ("centred", "positive_mean"):
        f0 = torch.randn(n, C, dtype=torch.float64, generator=generator)
        f0 = (f0 + (0.5 if case == "positive_mean" else 0.0)).to(dtype).double()
        beta = _clear_beta(f0, BETA)
    else:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    f = torch.stack([f0] + [f0[torch.randperm(n, generator=generator)] for _ in range(B - 1)])
    v = torch.randn(B, H, n, d, dtype=torch.float64, generator=generator)
    return f.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype), beta, GAMMA


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """max |a - e| / max |e| (0-d, float64, on the tensors' device)."""
    a, e = actual.double(), expected.double()
    return (a - e).abs().max() / e.abs().max()
