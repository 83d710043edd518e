"""Inputs of SC-CLIP's similarity ops (`similarity_aggregation`, `averaged_dual_softmax`) with
cosines a hair either side of their thresholds, for the Triton and CUDA kernel tests: the
threshold sits between two neighbouring cosines at least 2 MARGIN apart, so any decision taken in
less than float32 (one TF32 product: S off by ~1e-3) flips some of them, and float32 flips none.
The builders return CPU tensors (the tests move them); the float64 formulas are in
`helpers.sc_clip_math`."""
from __future__ import annotations

import torch

from helpers.sc_clip_math import cosines_f64

# an entry at least this far from the threshold decides alike in float32 and float64 (float32
# cosines of normalised features are off by ~1e-7)
MARGIN = 1e-5


def features(B, N, C, *, dtype=torch.float32, strided=False, generator=None):
    """f [B, N, C]: a shared direction plus noise (cosines spread around 0.5, mean(S) well above
    0); strided: a [B, C, N] map seen as [B, N, C]."""
    f = (torch.randn(B, N, C, dtype=torch.float64, generator=generator)
         + torch.randn(B, 1, C, dtype=torch.float64, generator=generator))
    if strided:
        f = f.transpose(1, 2).contiguous().transpose(1, 2)
    return f.to(dtype)


def values(shape, *, dtype=torch.float32, strided=False, generator=None):
    """A tensor of `shape`; strided: every other element of the last dim of a wider one."""
    t = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64, generator=generator)
    return (t[..., ::2] if strided else t[..., :shape[-1]].contiguous()).to(dtype)


def threshold_between(S, target, *, minimum=0.0):
    """A threshold between two neighbouring off-diagonal values of S (any batch) near `target`,
    whose gap is the narrowest of those >= 2 MARGIN: entries sit just above and just below it,
    each at least MARGIN away. Returns (threshold, distance of the nearest entry)."""
    N = S.shape[-1]
    off = S[:, ~torch.eye(N, dtype=torch.bool, device=S.device)].flatten().sort().values
    lo, hi = off[:-1], off[1:]
    gap = hi - lo
    ok = (gap >= 2 * MARGIN) & (lo >= minimum)
    mid = (lo + hi) / 2
    # the narrowest usable gap among the 64 nearest the target
    near = torch.where(ok, (mid - target).abs(), float("inf")).argsort()[:64]
    near = near[ok[near]]
    i = near[gap[near].argmin()]
    return float(mid[i]), float(gap[i] / 2)


def near_threshold_aggregation(B, N, C, *, dtype=torch.float32, generator=None):
    """(f, threshold): features and a threshold near 0.4 with cosines within a few 1e-4 of it on
    both sides (computed from f as rounded to `dtype`); 0.4 when N < 3 (too few cosines)."""
    f = features(B, N, C, dtype=dtype, generator=generator)
    if N < 3:
        return f, 0.4
    threshold, _ = threshold_between(cosines_f64(f), 0.4)
    return f, threshold


def near_threshold_dual(B, N, C, *, dtype=torch.float32, generator=None):
    """(f, beta): one image's features B times (so every image has the same mean(S)) and a beta
    putting beta * mean(S) between two close cosines; 1 when N < 3."""
    f = features(1, N, C, dtype=dtype, generator=generator).expand(B, N, C).contiguous()
    if N < 3:
        return f, 1.0
    S = cosines_f64(f[:1])
    threshold, _ = threshold_between(S, float(S.mean()) * 1.1)
    return f, threshold / float(S.mean())


def count_near(S, threshold, width=1e-3):
    """(entries within `width` below the threshold, within `width` at or above it)."""
    d = S - threshold
    return int(((d < 0) & (d > -width)).sum()), int(((d >= 0) & (d < width)).sum())
