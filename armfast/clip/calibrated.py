"""SC-CLIP, SFP and ResCLIP: last blocks that read earlier blocks, exact to their official code.

Notation as in `armfast.clip.baselines`; blocks are numbered from 0 (ViT-B/16: 0 to 11, the
last block 11 rewritten), ``X_i`` is block i's output ``[1 + N, W]`` (class token first),
``P_i`` its patch tokens, ``c_i`` its class token; ``cos(f)`` is the ``[N, N]`` cosine
similarity of patch tokens f; ``agg(S, x) = (S [S >= 0.4]) x / (row sums + 1e-6)``
(`armfast.ops.similarity_aggregation` when S = cos(f)); ``mask(S) = softmax(3 (S - mean S))``
with the entries below 0 set to -inf but the diagonal (the official code masks it too, which
only matters where a whole row falls below the mean: its row would be NaN) and one mean per
image over all N x N entries;
``branch(o) = out_proj(concat_heads(o))``. None of the three keeps the last block's residual or
FFN.

Where the official code is batch-1 only (SC-CLIP and SFP: the outlier search, the mean of S and
the head layout of ``S.repeat(heads, 1, 1)`` all assume one image), every image of a batch is
computed as if alone: the outlier search runs image by image, everything else is batched per
image. The positional embedding is resized to the exact grid (`interpolate_pos_embed`), as for
the other baselines, where the official repos use the DINO ``scale_factor`` idiom. The outlier
rules settled for non-square grids, precision and empty neighbourhoods are in
`armfast.clip.outliers`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from .baselines import NACLIP_SIGMA, LastBlockInput, register_baseline
from .blocks import attention_branch, qkv, value
from .outliers import class_attention_outliers, decision_dtype, lof_outliers, repair_outliers

THRESHOLD = 0.4  # SC-CLIP beta, SFP thres: cosine similarities below are dropped
MASK_GAMMA = 3.0  # both: softmax(3 (S - mean S))
RES_CLS = 0.3  # both: weight of the class token added to the last block's output
REFERENCE_BLOCK = 8  # SC-CLIP pre_adjust_idx; SFP hidden_states[8]
AGGREGATION_BLOCK = 3  # SC-CLIP post_adjust_idx; SFP hidden_states[3]
MULTI_LEVEL = tuple(range(3, 10))  # SC-CLIP multi_start_idx..multi_end_idx - 1; SFP [3:10]
RCS_BLOCKS = (5, 6, 7, 8)  # ResCLIP: range(5, 9)
RCS_TAU, RCS_LAMBDA = 2.0, 0.3  # ResCLIP attn_rcs_weights default of its configs


def _require(inp: LastBlockInput, name: str, hidden=(), attention=()) -> None:
    """A clear error when the input lacks the earlier blocks the baseline reads."""
    missing = [f"hidden[{i}]" for i in hidden if i not in inp.hidden]
    missing += [f"attention[{i}]" for i in attention if i not in inp.attention]
    if missing:
        raise ValueError(f"baseline {name!r} reads {', '.join(missing)} of LastBlockInput, which "
                         f"it lacks; armfast.clip.extract fills them (hidden: block outputs, "
                         f"attention: attention probabilities, 0-based blocks)")


def _outlier_masks(find, per_image) -> Tensor:
    """One image at a time, as the official code searches (it takes batch 1)."""
    return torch.stack([find(t) for t in per_image])


def _cosine(f: Tensor) -> Tensor:
    """``cos(f)`` ``[B, N, N]`` of patch tokens ``f [B, N, C]`` in float32 or wider, also under
    autocast (which would run the product in half precision)."""
    f = f.to(decision_dtype(f))
    f = f / f.norm(dim=-1, keepdim=True)
    with torch.autocast(f.device.type, enabled=False):
        return f @ f.transpose(-1, -2)


def _aggregate(weights: Tensor, x: Tensor) -> Tensor:
    """``W x / (rowsum W + 1e-6)`` with the weights ``[B, N, N]`` already thresholded."""
    w = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    return w.to(x.dtype) @ x


def _mask_softmax(s: Tensor, gamma: float = MASK_GAMMA) -> Tensor:
    """``mask(S)``: ``softmax(gamma (S - mean S))`` over the entries >= 0, one mean per image.
    The diagonal is always kept (as `armfast.ops.averaged_dual_softmax` does): on a flat crop
    S is 1 everywhere, ``S_ii - mean S`` rounds below 0 and the official row turns to NaN."""
    a = (s - s.mean(dim=(-2, -1), keepdim=True)) * gamma
    eye = torch.eye(a.shape[-1], dtype=torch.bool, device=a.device)
    return a.masked_fill((a < 0) & ~eye, float("-inf")).softmax(dim=-1)


def _multi_level(inp: LastBlockInput) -> Tensor:
    """``X_3 + ... + X_9`` summed in block order from zero (SC-CLIP's loop; SFP sums the
    stacked outputs, the same up to rounding)."""
    total = torch.zeros_like(inp.hidden[MULTI_LEVEL[0]])
    for i in MULTI_LEVEL:
        total = total + inp.hidden[i]
    return total


def _heads_out(block: nn.Module, o: Tensor) -> Tensor:
    """``branch`` of per-head outputs ``[B, H, N, d]``."""
    return attention_branch(block, o.transpose(1, 2).flatten(2))


# ----------------------------------------------------------------------------- SC-CLIP

def _scclip_attention(block: nn.Module, tokens: Tensor, f: Tensor, backend: str) -> Tensor:
    """SC-CLIP's ``custom_attn`` (lines 318-341) on patch tokens without a class token:
    ``branch((mask(cos f) + softmax(s K K^T)) / 2 V)``, Q unused."""
    _, k, v = qkv(block.attn, block.ln_1(tokens))
    # the op takes one dtype: under autocast k, v come out half while f stays float32
    o = ops.averaged_dual_softmax(f, k.to(f.dtype), v.to(f.dtype), gamma=MASK_GAMMA, beta=1.0,
                                  backend=backend)
    return _heads_out(block, o)


@register_baseline("scclip", hidden_blocks=MULTI_LEVEL)
def scclip(block: nn.Module, inp: LastBlockInput):
    """SC-CLIP (Bai et al., "Self-Calibrated CLIP for training-free open-vocabulary
    segmentation"), official SuleBai/SC-CLIP @ 0417ba9, ``clip/model.py`` lines 208-227 and
    269-373, with X = X_10 the last block's input:

    1. outliers: `lof_outliers` (``lof_pytorch``, k = 30, contamination 0.05) on P_10, image by
       image; P_10 and P_8 repaired (`repair_outliers`) into P'_10 and P'_8 (lines 269-283);
    2. ``Y = agg(cos P'_8, P'_10)`` (lines 284-288);
    3. ``Y = branch((mask(cos P'_8) + softmax(s K K^T)) / 2 V) + 0.3 c_10``, K and V of
       ``ln_1(Y)``; mask from the *unthresholded* cos P'_8 (lines 290-291, 318-341);
    4. ``Y = agg(cos P_3, Y)`` (lines 293-297);
    5. ``M = X_3 + ... + X_9``; ``Z = agg(cos P_3, branch(...same attention on ln_1(M's
       patches)...) + 0.3 (M's class token))`` (lines 299-305); returns ``Y + Z`` (line 306).

    ``mask`` and ``agg`` are `armfast.ops.averaged_dual_softmax` and
    `armfast.ops.similarity_aggregation` (fused, no N x N tensor); the LOF search holds N x N
    distances per image.
    """
    _require(inp, "scclip", hidden=MULTI_LEVEL)
    x, grid = inp.x, inp.grid
    outliers = _outlier_masks(lof_outliers, x[:, 1:])
    patches = repair_outliers(x[:, 1:], outliers, grid)
    ref = repair_outliers(inp.hidden[REFERENCE_BLOCK][:, 1:], outliers, grid)
    early = inp.hidden[AGGREGATION_BLOCK][:, 1:]

    def aggregate(f: Tensor, t: Tensor) -> Tensor:
        return ops.similarity_aggregation(f, t.to(f.dtype), threshold=THRESHOLD,
                                          backend=inp.backend)

    y = aggregate(ref, patches)
    y = _scclip_attention(block, y, ref, inp.backend) + RES_CLS * x[:, :1]
    y = aggregate(early, y)
    multi = _multi_level(inp)
    z = _scclip_attention(block, multi[:, 1:], ref, inp.backend) + RES_CLS * multi[:, :1]
    return y + aggregate(early, z), grid


# ----------------------------------------------------------------------------- SFP

@register_baseline("sfp", hidden_blocks=MULTI_LEVEL, attention_blocks=(-2,))
def sfp(block: nn.Module, inp: LastBlockInput):
    """SFP (Jin et al., "Feature Purification Matters", ICCV 2025), official Kimsure/SFP @
    2804f5b, ``SFP_ICCV/clip/model.py`` lines 242-394 with its segmentor's and base config's
    defaults (pm = 'SOM', purify on, res_cls 0.3). That commit's code differs from the paper's
    description; it is what is followed here. With X = X_10 and ``T = cos(P'_8) [>= 0.4]`` (the
    thresholded similarity, zeros kept):

    1. outliers: `class_attention_outliers` on block 10's attention maps (class-token row scaled
       by 1.5, then the head mean; class-token attention above self-attention; top 10), image
       by image; P_10 and P_8 repaired into P'_10 and P'_8 (lines 262-322);
    2. ``Y = agg(T, P'_10)`` (lines 323-326);
    3. ``Y = branch((softmax(s K K^T) + softmax(s Q Q^T) + mask(T)) / 3 V) + 0.3 c_10``, Q, K,
       V of ``ln_1(Y)``; mask(T)'s mean counts the zeros of T (lines 327-329, 358-378);
    4. ``Y = agg(cos P_3, Y)`` (lines 330-334);
    5. ``M = X_3 + ... + X_9``; ``Z = agg(cos P_3, branch(mask(T) V_M) + 0.3 (M's class
       token))``, V_M of ``ln_1(M's patches)``, no K K^T or Q Q^T term (lines 318, 336-340,
       380-394); returns ``Y + Z`` (line 341).

    T is built once in float32 or wider and serves both ``agg(T, .)`` and ``mask(T)``, so the
    two read the same thresholding; mask(T) is an explicit N x N map.
    """
    _require(inp, "sfp", hidden=MULTI_LEVEL, attention=(inp.depth - 2,))
    x, grid = inp.x, inp.grid
    maps = inp.attention[inp.depth - 2]
    outliers = _outlier_masks(class_attention_outliers, maps)
    patches = repair_outliers(x[:, 1:], outliers, grid)
    ref = repair_outliers(inp.hidden[REFERENCE_BLOCK][:, 1:], outliers, grid)
    sim = _cosine(ref)
    sim = sim.masked_fill(sim < THRESHOLD, 0.0)
    mask = _mask_softmax(sim)[:, None]  # [B, 1, N, N], every head

    def aggregate_early(t: Tensor) -> Tensor:
        f = inp.hidden[AGGREGATION_BLOCK][:, 1:]
        return ops.similarity_aggregation(f, t.to(f.dtype), threshold=THRESHOLD,
                                          backend=inp.backend)

    y = _aggregate(sim, patches)
    q, k, v = qkv(block.attn, block.ln_1(y))
    both = ops.self_correlation_sum(q, k, v, backend=inp.backend, layout="bnhd")  # [B, N, H, d]
    o = (both + (mask.to(v.dtype) @ v).transpose(1, 2)) / 3
    y = attention_branch(block, o.flatten(2)) + RES_CLS * x[:, :1]
    y = aggregate_early(y)
    multi = _multi_level(inp)
    v = value(block.attn, block.ln_1(multi[:, 1:]))
    z = _heads_out(block, mask.to(v.dtype) @ v) + RES_CLS * multi[:, :1]
    return y + aggregate_early(z), grid


# ----------------------------------------------------------------------------- ResCLIP

@register_baseline("resclip", attention_blocks=RCS_BLOCKS)
def resclip(block: nn.Module, inp: LastBlockInput, rcs_lambda: float = RCS_LAMBDA,
            rcs_tau: float = RCS_TAU, sigma: float = NACLIP_SIGMA):
    """ResCLIP's residual cross-correlation self-attention (Yang et al., CVPR 2025) on NACLIP,
    official yvhangyang/ResCLIP @ 0e085f7, ``clip/model.py`` lines 326-329 and 473-494,
    attention strategy 'resclip', architecture 'wo_resi':

        A = tau ((1 - lambda) softmax(s K K^T + G) + lambda RCS),   Y = branch(A V)

    over the class token and the patches, with G NACLIP's Gaussian of the grid distance (sigma
    5, 0 on the class token's row and column) and ``RCS = mean(A_5, A_6, A_7, A_8)``, A_i block
    i's ``softmax(s Q K^T)`` per head; no residual, no FFN. tau = 2 and lambda = 0.3 by
    default; the presets carry the per-dataset lambda of its configs (0.4 on Context59, COCO-
    Object and COCO-Stuff, 0.2 on Cityscapes, 0.6 on VOC20). Batched: nothing here is per image.

    ``A V`` is computed as ``tau ((1 - lambda) softmax(s K K^T + G) V + lambda RCS V``, the
    first term by `armfast.ops.gaussian_self_correlation`. The Semantic Feedback Refinement
    (SFR, a second pass from the first pass's segmentation) is not implemented: this is
    ResCLIP's RCS alone, the official ``use_sfr=False``.
    """
    for name, v in (("rcs_lambda", rcs_lambda), ("rcs_tau", rcs_tau), ("sigma", sigma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"resclip: {name} must be a number, got {v!r}")
    if not 0.0 <= rcs_lambda <= 1.0:
        raise ValueError(f"resclip: rcs_lambda must be in [0, 1], got {rcs_lambda}")
    _require(inp, "resclip", attention=RCS_BLOCKS)
    _, k, v = qkv(block.attn, block.ln_1(inp.x))
    rcs = torch.stack([inp.attention[i] for i in RCS_BLOCKS]).mean(dim=0)
    local = ops.gaussian_self_correlation(k, v, grid=inp.grid, sigma=float(sigma),
                                          backend=inp.backend, layout="bnhd")
    residual = (rcs.to(v.dtype) @ v).transpose(1, 2)
    o = rcs_tau * ((1 - rcs_lambda) * local + rcs_lambda * residual)
    return attention_branch(block, o.flatten(2))[:, 1:], inp.grid


__all__ = ["scclip", "sfp", "resclip", "THRESHOLD", "RES_CLS", "RCS_LAMBDA", "RCS_TAU",
           "RCS_BLOCKS", "MULTI_LEVEL"]
