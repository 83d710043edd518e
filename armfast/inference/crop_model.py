"""The crop forward that inference and training share (mmseg's ``encode_decode``):

    crops [B, 3, H, W] (CLIP-normalised, H and W multiples of the patch)
      -> the frozen CLIP's shallow tokens and a baseline's deep features   `CropModel.features`
      -> ARM's refined features, when there is an ARM                      `LogitHead.refine`
      -> cosine logits against the text queries, times a scale            `LogitHead.logits`

`LogitHead` is the part that learns: training wraps it in DDP and runs `CropModel.features`
under ``no_grad``; the `Segmentor` runs the whole under inference mode.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..clip.baselines import get_baseline
from ..clip.model import extract, feature_grid, output_dim, patch_size, vision_tower
from . import crop_budget


class LogitHead(nn.Module):
    """ARM (if any), then cosine logits against the text queries."""

    def __init__(self, arm: Optional[nn.Module] = None):
        super().__init__()
        self.arm = arm

    def refine(self, shallow: Sequence[Tensor], deep: Tensor, backend: str = "auto") -> Tensor:
        """ARM's refined features ``[B, N, E]``, or `deep` itself without ARM."""
        return deep if self.arm is None else self.arm(shallow, deep, backend=backend)

    def logits(self, x: Tensor, text: Tensor, logit_scale: Optional[float] = 1.0,
               backend: str = "auto") -> Tensor:
        """``logit_scale * cos(x, text)`` ``[B, N, S]``; ``logit_scale=None`` takes ARM's learnt
        tau (differentiable). Computed in float32 (float64 for a float64 model), also under
        autocast."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        text = text.to(x.dtype)
        # autocast off: a backend made of torch ops (sdpa) would run the product in bf16
        with torch.autocast(x.device.type, enabled=False):
            if logit_scale is None:
                if self.arm is None:
                    raise ValueError("logit_scale=None takes ARM's tau, but there is no ARM")
                return self.arm.logits(x, text, backend=backend)
            return ops.patch_text_logits(x, text, logit_scale=logit_scale, backend=backend)

    def forward(self, shallow: Sequence[Tensor], deep: Tensor, text: Tensor, *,
                logit_scale: Optional[float] = None, backend: str = "auto") -> Tensor:
        return self.logits(self.refine(shallow, deep, backend), text, logit_scale, backend)


class CropModel:
    """CLIP, a baseline's last block and an optional ARM over batches of crops.

    Args:
        clip: an open_clip CLIP (`armfast.clip.load_clip`).
        baseline: the default last-block rewrite (`features` takes another per call).
        arm: None or an `armfast.ARM` built for this CLIP.
        vfm: proxyclip's vision foundation model (a `VisionFoundationModel`).
        backend: `armfast.ops` backend of every attention and the logits.
        baseline_options: keyword options of `baseline` (the protocol's, e.g. resclip's
            ``rcs_lambda``); another baseline given to `features` runs with its defaults.
    """

    def __init__(self, clip: nn.Module, *, baseline: str, arm: Optional[nn.Module] = None,
                 vfm=None, backend: str = "auto", baseline_options=None):
        self.clip, self.visual = clip, vision_tower(clip)
        self.baseline, self.vfm, self.backend = baseline, vfm, backend
        self.baseline_options = dict(baseline_options or {})
        self.head = LogitHead(arm)
        self.shallow_layers = tuple(arm.config.shallow_layers) if arm is not None else ()
        self.patch = patch_size(self.visual)

    @property
    def arm(self) -> Optional[nn.Module]:
        return self.head.arm

    def features(self, crops: Tensor, baseline: Optional[str] = None
                 ) -> tuple[list[Tensor], Tensor, tuple[int, int]]:
        """``(shallow, deep, (h, w))``: ARM's inputs (`armfast.clip.extract`) and the deep
        features' grid. Runs under the caller's grad mode."""
        options = self.baseline_options if baseline in (None, self.baseline) else None
        baseline = baseline or self.baseline
        shallow, deep = extract(self.clip, crops, baseline=baseline,
                                shallow_layers=self.shallow_layers, backend=self.backend,
                                vfm=self.vfm, baseline_options=options)
        return shallow, deep, feature_grid(self.visual, crops.shape[-2:], baseline, self.vfm)

    def __call__(self, crops: Tensor, text: Tensor, logit_scale: Optional[float] = 1.0) -> Tensor:
        """Patch logits ``[B, S, h, w]`` of `crops` against `text` (see `LogitHead.logits`)."""
        shallow, deep, (h, w) = self.features(crops)
        x = self.head.refine(shallow, deep, self.backend)
        logits = self.head.logits(x, text, logit_scale, self.backend)
        return logits.transpose(1, 2).unflatten(-1, (h, w))

    def crop_bytes(self, crop_shape: Sequence[int], queries: int, elem_size: int) -> int:
        """`armfast.inference.crop_budget.crop_bytes` of one crop of ``(h, w)`` pixels (padded
        to the patch) scored against `queries` text embeddings."""
        ph, pw = self.patch
        padded = (-(-crop_shape[0] // ph) * ph, -(-crop_shape[1] // pw) * pw)
        grid = (padded[0] // ph, padded[1] // pw)
        deep = feature_grid(self.visual, padded, self.baseline, self.vfm)
        blocks = self.visual.transformer.resblocks
        heads = getattr(getattr(blocks[-1], "attn", None), "num_heads", 1)
        held_blocks, held_maps = get_baseline(self.baseline).blocks(len(blocks))
        return crop_budget.crop_bytes(
            tokens=grid[0] * grid[1] + 1, width=self.visual.conv1.weight.shape[0], heads=heads,
            queries=queries, patches=deep[0] * deep[1], embed_dim=output_dim(self.visual),
            shallow_layers=len(self.shallow_layers),
            explicit_softmax=self.backend == "reference",  # the fused ops keep no T x T map
            arm_heads=self.arm.config.num_heads if self.arm is not None else None,
            elem_size=elem_size, held_blocks=len(held_blocks), held_maps=len(held_maps))
