"""ProxyCLIP's affinities and their mask, as every Python-side backend computes them.

masked_affinity_attention keeps S_ij = cos(f_i, f_j) where ``S_ij >= beta mean(S)`` (and on the
diagonal): a discrete decision per pair. Rounded to bfloat16 (8 bits), an affinity near 0.8 moves
by up to 2e-3, more than many pairs lie from the threshold, and each pair that lands on the other
side moves its row's output by about 1 / sqrt(kept keys). So S, mean(S) and the mask are float32
whatever the input dtype (float64 for float64): the dot products of the features are exact
products summed in float32, then scaled by the inverse norms, as the fused kernels do.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._library import NORM_EPS, lse_dtype


def inverse_norms(f: Tensor) -> Tensor:
    """rnorm [B, n] = 1 / max(|f_i|, eps) (as F.normalize), float32 (float64 for float64)."""
    return 1.0 / torch.linalg.vector_norm(f, dim=-1, dtype=lse_dtype(f.dtype)).clamp_min(NORM_EPS)


def first_pass(f: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The O(n C) first pass of the fused kernels: (rnorm [B, n], thresh [B]), thresh = beta *
    mean(S), where mean(S) over all n x n cosines is |mean_i f_i rnorm_i|^2. float32 (float64
    for float64 features), contiguous."""
    rnorm = inverse_norms(f)
    mean = torch.bmm(rnorm.unsqueeze(1), f.to(rnorm.dtype)).squeeze(1) / f.shape[1]  # [B, C]
    return rnorm.contiguous(), (beta * mean.square().sum(-1)).contiguous()


def normalized(f: Tensor, rnorm: Tensor) -> Tensor:
    """f_i rnorm_i [B, n, C] in rnorm's dtype (float32, or float64 for float64)."""
    return f.to(rnorm.dtype) * rnorm.unsqueeze(-1)


def affinities(f: Tensor, rnorm: Tensor | None = None) -> Tensor:
    """S [B, n, n] = cos(f_i, f_j) (F.normalize's eps), float32 (float64 for float64); rnorm:
    `inverse_norms(f)` if already at hand. On CUDA half features multiply on tensor cores into
    float32 (products of two halves are exact in float32: the float32 sum), then scale by the
    inverse norms (not where autograd records: that product has no derivative); elsewhere the
    features are normalised in float32 first. float32 inputs follow torch's matmul precision
    (TF32 only where the user allowed it)."""
    rnorm = inverse_norms(f) if rnorm is None else rnorm
    recorded = torch.is_grad_enabled() and f.requires_grad
    if f.is_cuda and f.dtype in (torch.float16, torch.bfloat16) and not recorded:
        dots = torch.bmm(f, f.transpose(1, 2), out_dtype=rnorm.dtype)
        return dots * rnorm.unsqueeze(2) * rnorm.unsqueeze(1)
    fn = normalized(f, rnorm)
    return torch.bmm(fn, fn.transpose(1, 2))


def keep_mask(s: Tensor, thresh: Tensor) -> Tensor:
    """[B, n, n] bool: S_ij >= thresh[b], or i == j (the diagonal always stays)."""
    n = s.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    return (s >= thresh.view(-1, 1, 1)) | eye
