"""Independent float64 formulas of the baseline attentions and inputs for them, shared by the CPU,
Triton and CUDA tests (tests/ops/test_baseline_ops.py, tests/triton/,
tests/ops/test_cuda_baseline_ops.py).

Every formula computes on its inputs' device and makes nothing on another one: the GPU tests
call them with CUDA tensors. tests/test_helpers_device_clean.py checks that on a fake CUDA
device, without a GPU.
"""
from __future__ import annotations

import torch

from armfast.bench.workloads import affinity_features

# (h, w) grids: one patch, non-square, ViT-B/16 at 224 and 448 px, and wide
GRIDS = ((1, 1), (7, 5), (14, 14), (28, 28), (5, 9))


def _softmax(s):
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def self_correlation_f64(x, v, scale=None):
    x, v = x.double(), v.double()
    scale = x.shape[-1] ** -0.5 if scale is None else scale
    return _softmax(scale * x @ x.transpose(-1, -2)) @ v


def self_correlation_sum_f64(q, k, v, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (_softmax(scale * q @ q.transpose(-1, -2)) + _softmax(scale * k @ k.transpose(-1, -2))) @ v


def grid_gaussian_f64(h, w, sigma, class_token, device="cpu"):
    """G [T, T] from each patch's (row, column) = divmod(patch index, w)."""
    first = int(class_token)
    index = torch.arange(h * w, device=device)
    row, col = (index // w).double(), (index % w).double()
    dist2 = (row[:, None] - row[None, :]) ** 2 + (col[:, None] - col[None, :]) ** 2
    G = torch.zeros(h * w + first, h * w + first, dtype=torch.float64, device=device)
    G[first:, first:] = torch.exp(-dist2 / (2 * sigma ** 2))
    return G


def gaussian_self_correlation_f64(x, v, grid, sigma=5.0, class_token=True, scale=None):
    x, v = x.double(), v.double()
    scale = x.shape[-1] ** -0.5 if scale is None else scale
    G = grid_gaussian_f64(*grid, sigma, class_token, device=x.device)
    return _softmax(scale * x @ x.transpose(-1, -2) + G) @ v


def masked_affinity_f64(f, v, beta=1.2, gamma=3.0):
    f, v = f.double(), v.double()
    fn = f / f.norm(dim=-1, keepdim=True)
    S = fn @ fn.transpose(-1, -2)
    A = gamma * (S - beta * S.mean(dim=(1, 2), keepdim=True))
    off_diagonal = ~torch.eye(S.shape[-1], dtype=torch.bool, device=S.device)
    A = A.masked_fill((A < 0) & off_diagonal, float("-inf"))
    return _softmax(A).unsqueeze(1) @ v


def heads(B, H, N, d, *, dtype=torch.float32, device="cpu", strided=False, generator=None, count=3):
    """`count` tensors [B, H, N, d]; strided=True gives views of one [B, N, count, H, d]
    projection, as the baselines get them from a fused qkv projection."""
    if strided:
        proj = torch.randn(B, N, count, H, d, dtype=torch.float64, generator=generator)
        ts = proj.to(device=device, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
        assert N == 1 or all(not t.is_contiguous() for t in ts)
        return ts
    return tuple(torch.randn(B, H, N, d, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)
                 for _ in range(count))


def affinity_inputs(B, n, C, H, d, *, dtype=torch.float32, device="cpu", strided=False, generator=None):
    """(f [B, n, C], v [B, H, n, d], beta) with no affinity near the mask threshold (see
    `armfast.bench.workloads.affinity_features`); strided: f as a VFM's [B, C, n] map seen as
    [B, n, C], v as a [B, n, H, d] projection seen as [B, H, n, d]."""
    f, beta = affinity_features(B, n, C, generator)
    v = torch.randn(B, H, n, d, dtype=torch.float64, generator=generator)
    if strided:
        f = f.transpose(1, 2).contiguous().transpose(1, 2)
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    return f.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype), beta


def two_cluster_features(n_first, n_second, C=16, *, dtype=torch.float32, generator=None):
    """f [1, n, C]: two groups of near-identical features along orthogonal directions. Mean(S) is
    about (n_first^2 + n_second^2) / n^2 and cross-group affinities about 0, so they are masked:
    the rows of the second group see only masked keys in the first key tiles."""
    f = torch.zeros(1, n_first + n_second, C, dtype=torch.float64)
    f[0, :n_first, 0] = 1
    f[0, n_first:, 1] = 1
    f += 0.01 * torch.randn(f.shape, dtype=torch.float64, generator=generator)
    return f.to(dtype)
