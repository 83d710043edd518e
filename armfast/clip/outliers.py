"""Outlier patch tokens and their repair, as SC-CLIP and SFP find and mend them.

Both methods look, in the input of CLIP's last block, for a few patch tokens that behave unlike
their neighbours ("outliers": high-norm tokens that soak up attention), and replace each by the
mean of its non-outlier 8-neighbours on the patch grid.

- `lof_outliers`: SC-CLIP's ``lof_pytorch`` (SuleBai/SC-CLIP @ 0417ba9, ``clip/model.py`` lines
  208-227): squared Euclidean distances, the ``k`` nearest neighbours of each token, the reach
  distance ``max(d(i, j), k-distance(i))`` taken with the token's *own* k-distance (so every
  reach distance of i equals i's k-distance: this is not textbook LOF), ``lrd = k / mean reach``,
  score = mean over the neighbours j of ``lrd_j / lrd_i``; outliers are the scores strictly above
  their ``1 - contamination`` quantile (linear interpolation).
- `class_attention_outliers`: SFP's 'SOM' detector (Kimsure/SFP @ 2804f5b,
  ``SFP_ICCV/clip/model.py`` lines 264 and 271-287): in the head-mean attention of the last
  block's input block, with the class token's row over the patches scaled by ``0.3 * 5.0``, the
  patches the class token attends to more than they attend to themselves; the ``top`` largest.
- `repair_outliers`: both repos' ``mean_interpolation`` (SC-CLIP lines 348-373, SFP lines
  416-441): a 3x3 sum without the centre over the non-outlier tokens (zero padding), divided by
  their count.

Settled where the official code is loose, one image at a time as it runs:

- token index -> grid cell is ``(idx // w, idx % w)`` with w the grid's *width* (both repos divide
  by the height, which scrambles non-square crops and fails at 336x448); here a mask over the
  row-major tokens is reshaped to ``(h, w)``, which is that mapping;
- the quantile is taken in the scores' own precision (SC-CLIP rounds them to float32 for it);
- every decision is made in float32 or wider whatever the token dtype, autocast off (the
  official code runs fp16 on a GPU), so a backend or precision change cannot flip an outlier;
- an outlier without a non-outlier neighbour keeps its value (SC-CLIP does; SFP writes 0, which
  turns the crop's features into NaN once normalised); no outlier leaves the tokens unchanged
  (SC-CLIP fails there);
- fewer tokens than ``k + 1``: ``k`` becomes ``N - 1`` (scikit-learn's LocalOutlierFactor rule,
  which SC-CLIP's first release called); one token has no outlier. The official code fails.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOF_NEIGHBORS = 30  # SC-CLIP: n_neighbors
LOF_CONTAMINATION = 0.05  # SC-CLIP: contamination
SFP_CLASS_SCALE = 0.3 * 5.0  # SFP: res_cls * res_scale on the class token's attention row
SFP_TOP = 10  # SFP: outliers kept, the strongest first


def decision_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bfloat16 tokens, their own dtype when wider."""
    return torch.promote_types(t.dtype, torch.float32)


def lof_scores(x: Tensor, n_neighbors: int = LOF_NEIGHBORS) -> Tensor:
    """SC-CLIP's LOF score of each row of ``x [N, C]`` (one image's patch tokens), ``[N]`` in
    float32 or wider. ``n_neighbors`` is clamped to ``N - 1``."""
    if x.dim() != 2:
        raise ValueError(f"x must be one image's tokens [N, C], got shape {tuple(x.shape)}")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be a positive integer, got {n_neighbors!r}")
    x = x.to(decision_dtype(x))
    k = min(n_neighbors, x.shape[0] - 1)
    if k < 1:
        return x.new_ones(x.shape[0])
    # ||x_i - x_j|| from the differences (no |a|^2 + |b|^2 - 2ab cancellation), then squared
    with torch.autocast(x.device.type, enabled=False):
        distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    knn_distances, knn_indices = torch.topk(distances, k=k + 1, largest=False)
    knn_distances, knn_indices = knn_distances[:, 1:], knn_indices[:, 1:]  # drop the token itself
    k_distances = knn_distances[:, -1:].expand_as(knn_distances)
    reach = torch.max(knn_distances, k_distances)  # = each token's own k-distance (see above)
    lrd = k / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    return (lrd[knn_indices] / lrd.unsqueeze(1)).mean(dim=1)


def lof_outliers(x: Tensor, n_neighbors: int = LOF_NEIGHBORS,
                 contamination: float = LOF_CONTAMINATION) -> Tensor:
    """Bool mask ``[N]`` of SC-CLIP's outliers among the rows of ``x [N, C]``: LOF scores
    strictly above their ``1 - contamination`` quantile."""
    return quantile_outliers(lof_scores(x, n_neighbors), contamination)


def quantile_outliers(scores: Tensor, contamination: float = LOF_CONTAMINATION) -> Tensor:
    """``scores > quantile(scores, 1 - contamination)``, the quantile (linear interpolation)
    taken in the scores' own precision."""
    if isinstance(contamination, bool) or not isinstance(contamination, (int, float)) \
            or not 0.0 <= contamination < 1.0:
        raise ValueError(f"contamination must be a number in [0, 1), got {contamination!r}")
    return scores > torch.quantile(scores, 1 - contamination)


def class_attention_outliers(attn: Tensor, *, class_scale: float = SFP_CLASS_SCALE,
                             top: int = SFP_TOP) -> Tensor:
    """Bool mask ``[N]`` of SFP's outliers from one image's attention probabilities
    ``attn [H, 1 + N, 1 + N]`` (class token first): with ``c_j = mean_h(class_scale *
    attn[h, 0, 1 + j])`` and ``d_j = mean_h(attn[h, 1 + j, 1 + j])``, the ``top`` largest c_j
    among the patches where ``c_j > d_j`` (ties in c broken towards the lower index)."""
    if attn.dim() != 3 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] < 2:
        raise ValueError(f"attn must be one image's attention maps [H, 1 + N, 1 + N], got shape "
                         f"{tuple(attn.shape)}")
    attn = attn.to(decision_dtype(attn))
    to_patch = (attn[:, 0, 1:] * class_scale).mean(dim=0)
    self_attn = torch.diagonal(attn[:, 1:, 1:], dim1=-2, dim2=-1).mean(dim=0)
    salient = to_patch > self_attn
    # strongest first among the salient patches; the others sort last
    order = torch.sort(torch.where(salient, to_patch, to_patch.new_tensor(-float("inf"))),
                       descending=True, stable=True).indices
    mask = torch.zeros_like(salient)
    chosen = order[:top]
    mask[chosen] = salient[chosen]
    return mask


def repair_outliers(tokens: Tensor, outliers: Tensor, grid: tuple[int, int]) -> Tensor:
    """Each outlier of ``tokens [B, h*w, C]`` (row-major patches, ``outliers [B, h*w]`` bool)
    replaced by the mean of its non-outlier 8-neighbours on the ``(h, w)`` grid; kept where it
    has none. Returns a new tensor in the tokens' dtype."""
    B, N, C = tokens.shape
    h, w = grid
    if N != h * w or outliers.shape != (B, N):
        raise ValueError(f"tokens [B, h*w, C] and outliers [B, h*w] must match grid {grid}; got "
                         f"{tuple(tokens.shape)} and {tuple(outliers.shape)}")
    fmap = tokens.transpose(1, 2).reshape(B, C, h, w)
    keep = (~outliers).to(tokens.dtype).view(B, 1, h, w)
    ring = torch.ones(C, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    ring[:, :, 1, 1] = 0
    neighbour_sum = F.conv2d(fmap * keep, ring, padding=1, groups=C)
    count = F.conv2d(keep, ring[:1], padding=1)
    mean = neighbour_sum / count.clamp_min(1)
    update = outliers.view(B, 1, h, w) & (count > 0)
    return torch.where(update, mean, fmap).flatten(2).transpose(1, 2)


__all__ = ["lof_scores", "lof_outliers", "quantile_outliers", "class_attention_outliers",
           "repair_outliers", "LOF_NEIGHBORS", "LOF_CONTAMINATION", "SFP_CLASS_SCALE", "SFP_TOP", "decision_dtype"]
