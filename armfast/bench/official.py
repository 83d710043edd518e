"""The "official-style" path of the pipeline benchmark: slide inference as the SCLIP, ClearCLIP
and NACLIP repositories run it, the yardstick of `armfast.bench.pipeline`.

Their ``CLIPForSegmentation.predict`` (mmseg segmentors around a vendored OpenAI CLIP), ported
to open_clip modules with the structure kept:

- float32, eager PyTorch: blocks 0..10 through each block's own ``forward``
  (``nn.MultiheadAttention``), the last block written out with ``bmm`` and explicit softmaxes
  in the sequence-first layout, as their ``custom_attn`` does; ClearCLIP also runs the
  unchanged last block, whose output it discards;
- ``forward_slide``: a Python double loop over the windows, one crop at a time; each crop's
  logits are upsampled to the crop, ``F.pad``-ed to the image size and added to it;
- ``postprocess_result``: scale, softmax over the queries, the per-class maximum over
  synonyms through a one-hot ``[classes, queries, H, W]`` product, SCLIP's ``area_thd``,
  argmax and ``prob_thd``.

Two departures, both so that the benchmark can check this path against armfast's on the same
inputs: the positional embedding is interpolated to exactly the crop's grid (the repositories
use ``scale_factor=(g + 0.1) / 14``, a slightly different resampling at the same cost), and the
image is resized by armfast's `Preparer` (mmseg resizes in its data pipeline).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip import model as clip_model
from ..clip.baselines import NACLIP_SIGMA
from ..ops._specs import gaussian_bias
from ..clip.blocks import run_block_module, transformer_batch_first

BASELINES = ("sclip", "clearclip", "naclip")


class OfficialStyle:
    """``predict(image)`` the way the baselines' repositories compute it (module docstring),
    with the protocol, text queries and post-processing rules of an armfast `Segmentor`."""

    def __init__(self, segmentor):
        if segmentor.baseline not in BASELINES:
            raise ValueError(f"the official-style path covers {', '.join(BASELINES)}, not "
                             f"{segmentor.baseline!r}")
        if segmentor.crop is None:
            raise ValueError("the official-style path is slide inference: give a crop")
        self.seg = segmentor
        self.visual = segmentor.visual
        self.baseline = segmentor.baseline
        self.dtype = self.visual.conv1.weight.dtype  # float32 (float64 in tests)
        # unit rows in the model's dtype, as their text encoding leaves them
        self.query_features = F.normalize(segmentor.text.to(self.dtype), dim=-1)
        self.query_idx = segmentor.class_index
        self.num_queries = len(self.query_idx)
        self.num_classes = segmentor.num_classes
        self.patch = segmentor.patch[0]
        self.batch_first = transformer_batch_first(self.visual.transformer)

    # ---- CLIP with the baseline's last block ----------------------------------------------
    def custom_attn(self, attn: nn.MultiheadAttention, x: Tensor, grid) -> Tensor:
        """The last block's attention on sequence-first ``x [T, B, W]``, as their code writes it."""
        num_heads = attn.num_heads
        _, bsz, embed_dim = x.size()
        head_dim = embed_dim // num_heads
        scale = head_dim ** -0.5
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
        if self.baseline == "sclip":
            q_attn = torch.bmm(q, q.transpose(1, 2)) * scale
            k_attn = torch.bmm(k, k.transpose(1, 2)) * scale
            attn_weights = F.softmax(q_attn, dim=-1) + F.softmax(k_attn, dim=-1)
        elif self.baseline == "clearclip":
            attn_weights = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
        else:  # naclip: key-key attention plus the cached Gaussian neighbourhood
            attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
            attn_weights += gaussian_bias(*grid, NACLIP_SIGMA, device=str(x.device), dtype=x.dtype)
            attn_weights = F.softmax(attn_weights, dim=-1)
        attn_output = torch.bmm(attn_weights, v)
        attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
        return attn.out_proj(attn_output)

    def encode_image(self, img: Tensor) -> Tensor:
        """All tokens after ``ln_post`` and ``proj``, ``[B, T, E]`` (their ``return_all=True``)."""
        x, grid = clip_model.embed(self.visual, img)
        blocks = self.visual.transformer.resblocks
        for blk in blocks[:-1]:
            x = run_block_module(blk, x, self.batch_first)
        blk = blocks[-1]
        x = x.permute(1, 0, 2)  # NLD -> LND
        if self.baseline == "sclip":
            x = x + self.custom_attn(blk.attn, blk.ln_1(x), grid)
            x = x + blk.mlp(blk.ln_2(x))
        elif self.baseline == "clearclip":
            out = self.custom_attn(blk.attn, blk.ln_1(x), grid)
            run_block_module(blk, x.permute(1, 0, 2), self.batch_first)  # computed and unused
            x = out
        else:
            x = self.custom_attn(blk.attn, blk.ln_1(x), grid)
        x = x.permute(1, 0, 2)  # LND -> NLD
        return self.visual.ln_post(x) @ self.visual.proj

    # ---- their segmentor ------------------------------------------------------------------
    def forward_feature(self, img: Tensor) -> Tensor:
        image_features = self.encode_image(img)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        image_features = image_features[:, 1:]
        logits = image_features @ self.query_features.T
        w, h = img[0].shape[-2] // self.patch, img[0].shape[-1] // self.patch
        out_dim = logits.shape[-1]
        logits = logits.permute(0, 2, 1).reshape(-1, out_dim, w, h)
        return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")

    def forward_slide(self, img: Tensor, ori_shape) -> Tensor:
        h_stride, w_stride = self.seg.stride
        h_crop, w_crop = self.seg.crop
        batch_size, _, h_img, w_img = img.shape
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = img.new_zeros((batch_size, self.num_queries, h_img, w_img))
        count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1 = h_idx * h_stride
                x1 = w_idx * w_stride
                y2 = min(y1 + h_crop, h_img)
                x2 = min(x1 + w_crop, w_img)
                y1 = max(y2 - h_crop, 0)
                x1 = max(x2 - w_crop, 0)
                crop_img = img[:, :, y1:y2, x1:x2]
                crop_seg_logit = self.forward_feature(crop_img)
                preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1),
                                                int(preds.shape[2] - y2)))
                count_mat[:, :, y1:y2, x1:x2] += 1
        preds = preds / count_mat
        return F.interpolate(preds, size=ori_shape, mode="bilinear")

    def postprocess_result(self, seg_logits: Tensor) -> Tensor:
        seg_logits = seg_logits[0] * self.seg.logit_scale
        seg_logits = seg_logits.softmax(0)  # n_queries * w * h
        num_cls, num_queries = self.num_classes, self.num_queries
        if num_cls != num_queries:
            seg_logits = seg_logits.unsqueeze(0)
            cls_index = F.one_hot(self.query_idx)
            cls_index = cls_index.T.view(num_cls, num_queries, 1, 1)
            seg_logits = (seg_logits * cls_index).max(1)[0]
        if self.seg.area_thd is not None:
            predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
            area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
            area_pred = (area_pred > self.seg.area_thd * area_pred.sum()).to(seg_logits.dtype)
            seg_logits[1:] *= area_pred.transpose(0, -1)
        seg_pred = seg_logits.argmax(0, keepdim=True)
        seg_pred[seg_logits.max(0, keepdim=True)[0] < self.seg.prob_thd] = 0
        return seg_pred[0]

    @torch.no_grad()
    def logits(self, image) -> Tensor:
        """Averaged logits ``[S, H0, W0]`` at the input's size (unscaled, before softmax)."""
        p = self.seg.preparer(image, device=self.seg.device)
        return self.forward_slide(p.pixels.to(self.dtype), p.size)[0]

    @torch.no_grad()
    def predict(self, image) -> Tensor:
        p = self.seg.preparer(image, device=self.seg.device)
        return self.postprocess_result(self.forward_slide(p.pixels.to(self.dtype), p.size))
