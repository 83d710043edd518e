"""Independent float64 formulas of SC-CLIP's ops (`ops.similarity_aggregation`,
`ops.averaged_dual_softmax`) and inputs for them, shared by the CPU, Triton and CUDA tests.

The formulas compute on their inputs' device; the builders compute on float64 CPU data (they pick
thresholds from the sorted similarities) and return tensors on the device asked
(tests/test_helpers_device_clean.py checks both).
"""
from __future__ import annotations

import torch

# offsets from the threshold of the pairs `near_threshold_features` builds: a bfloat16 S rounds
# the negative ones below 5e-4 up to 0.40039 >= 0.4, so a backend deciding in bfloat16 flips them
OFFSETS = (1e-3, -1e-3, 5e-4, -5e-4, 3e-4, -3e-4, 2e-4, -2e-4)


def cosines_f64(f):
    """S [B, N, N]: the cosines of f's rows (norms clamped at 1e-12, as F.normalize)."""
    f = f.double()
    return (f @ f.transpose(1, 2)) / (f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                                      * f.norm(dim=-1).clamp_min(1e-12).unsqueeze(1))


def similarity_f64(f, x, threshold=0.4):
    """W x / (rowsum(W) + 1e-6), W = S [S >= threshold]."""
    S = cosines_f64(f)
    W = torch.where(S >= threshold, S, torch.zeros_like(S))
    return (W @ x.double()) / (W.sum(-1, keepdim=True) + 1e-6)


def _softmax(a):
    e = torch.exp(a - a.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def dual_softmax_f64(f, k, v, scale=None, gamma=3.0, beta=1.0):
    """((P_mask + softmax(scale k k^T)) / 2) v per head; P_mask = softmax(gamma (S - beta mean S))
    with mean S per image over all N x N entries, entries below 0 masked but the diagonal kept."""
    k, v = k.double(), v.double()
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    S = cosines_f64(f)
    A = gamma * (S - beta * S.mean(dim=(1, 2), keepdim=True))
    off = ~torch.eye(S.shape[-1], dtype=torch.bool, device=S.device)
    mask = _softmax(A.masked_fill((A < 0) & off, float("-inf")))
    self_k = _softmax(scale * k @ k.transpose(-1, -2))
    return ((mask.unsqueeze(1) + self_k) / 2) @ v


def in_widest_gap(values, lo, hi, margin=2e-5):
    """A number in [lo, hi] in the middle of the widest gap between `values` (a 1-D float64
    tensor): no value is then near it, where float32 rounding could decide either way."""
    inside = values[(values > lo) & (values < hi)].sort().values
    edges = torch.cat([inside.new_tensor([lo]), inside, inside.new_tensor([hi])])
    gaps = edges[1:] - edges[:-1]
    i = int(gaps.argmax())
    assert gaps[i] > 2 * margin, "no gap wide enough: change the seed"
    return float(edges[i] + gaps[i] / 2)


def _features(B, N, C, generator, strided):
    """f [B, N, C] float64 on the CPU (a per-image shared direction plus noise, so cosines spread
    around 0.4 and the images' mean similarities differ); strided: a [B, C, N] map seen as
    [B, N, C]."""
    shared = torch.randn(B, 1, C, dtype=torch.float64, generator=generator)
    weight = torch.linspace(0.4, 1.0, B, dtype=torch.float64).view(B, 1, 1)
    f = torch.randn(B, N, C, dtype=torch.float64, generator=generator) + weight * shared
    return f.transpose(1, 2).contiguous().transpose(1, 2) if strided else f


def similarity_inputs(B, N, C=48, D=40, *, dtype=torch.float32, device="cpu", strided=False, seed=0):
    """(f [B, N, C], x [B, N, D], threshold) with no S within float32 rounding of the threshold;
    strided: f as a [B, C, N] map, x every other column of a [B, N, 2D] tensor."""
    g = torch.Generator().manual_seed(seed)
    f = _features(B, N, C, g, strided).to(dtype)
    x = torch.randn(B, N, 2 * D if strided else D, dtype=torch.float64, generator=g).to(dtype)
    threshold = in_widest_gap(cosines_f64(f).flatten(), 0.3, 0.5)
    x = x[..., ::2] if strided else x
    return f.to(device), x.to(device), threshold


def dual_inputs(B, N, C=48, H=3, d=16, *, dtype=torch.float32, device="cpu", strided=False, seed=0):
    """(f [B, N, C], k [B, H, N, d], v, beta) with every S clear of its image's threshold
    beta * mean(S); strided: f as a [B, C, N] map, k and v views of one [B, N, 2, H, d] projection."""
    g = torch.Generator().manual_seed(seed)
    f = _features(B, N, C, g, strided).to(dtype)
    if strided:
        k, v = torch.randn(B, N, 2, H, d, dtype=torch.float64, generator=g).to(dtype).permute(2, 0, 3, 1, 4)
    else:
        k, v = (torch.randn(B, H, N, d, dtype=torch.float64, generator=g).to(dtype) for _ in range(2))
    S = cosines_f64(f)
    beta = in_widest_gap((S / S.mean(dim=(1, 2), keepdim=True)).flatten(), 0.8, 1.4, margin=1e-5)
    return f.to(device), k.to(device), v.to(device), beta


def _integer_direction(target):
    """(r, s, t) small integers (exact in bfloat16) whose cosine with (1, 0, 0) is nearest to
    `target`, and that cosine."""
    r, s, t = torch.meshgrid(torch.arange(1, 41), torch.arange(0, 41), torch.arange(0, 41),
                             indexing="ij")
    cos = r / (r * r + s * s + t * t).double().sqrt()
    i = int((cos - target).abs().argmin())
    return (int(r.flatten()[i]), int(s.flatten()[i]), int(t.flatten()[i])), float(cos.flatten()[i])


def near_threshold_features(dtype, threshold=0.4, *, device="cpu"):
    """f [2, 16, 24] exact in `dtype`: eight pairs of tokens, each pair in its own 3 dims (other
    pairs are orthogonal to it), with cosine threshold + offset for the OFFSETS; the images hold
    the pairs in different orders and scales (so their mean similarities are equal)."""
    f = torch.zeros(2, 16, 24, dtype=torch.float64)
    for p, offset in enumerate(OFFSETS):
        (r, s, t), cos = _integer_direction(threshold + offset)
        assert abs(cos - threshold - offset) < abs(offset) / 4 and (cos > threshold) == (offset > 0)
        for b, scale in enumerate((1, 3)):
            slot = p if b == 0 else len(OFFSETS) - 1 - p
            f[b, 2 * slot, 3 * p] = 2 * scale
            f[b, 2 * slot + 1, 3 * p:3 * p + 3] = torch.tensor([r, s, t], dtype=torch.float64) * scale
    assert torch.equal(f.to(dtype).double(), f)
    return f.to(device=device, dtype=dtype)


def alternating_values(shape, dtype, generator, *, device="cpu"):
    """Values [..., N, D] far apart between the two tokens of each pair (2 and -2, plus noise), so
    a flipped decision shows in the output."""
    sign = torch.ones(shape[-2], 1, dtype=torch.float64)
    sign[1::2] = -1
    values = 2 * sign + 0.3 * torch.randn(shape, dtype=torch.float64, generator=generator)
    return values.to(device=device, dtype=dtype)
