"""Randomly initialised CLIP models for the CLIP-hook tests, built once per test session.

- `vit_b16()`: open_clip's ViT-B-16 with random weights (the real architecture; ~3 s to build).
- `tiny_clip()`: a registered 3-block, width-64 CLIP ("armfast-tiny-test") with a text tower,
  for float64 checks, checkpoints and text embeddings at no cost.
- `tiny_tower(...)`: a bare open_clip VisionTransformer of any image size / block type;
- `FakeDino`: a DINO hub-style ViT stand-in, proxyclip's vision foundation model.
"""
from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

TINY_NAME = "armfast-tiny-test"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@lru_cache(maxsize=None)
def vit_b16():
    from armfast.clip import load_clip

    torch.manual_seed(0)
    return load_clip("ViT-B-16", pretrained=None)


@lru_cache(maxsize=None)
def register_tiny() -> str:
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="armfast-clip-config-"))
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    return TINY_NAME


@lru_cache(maxsize=None)
def tiny_clip():
    from armfast.clip import load_clip

    torch.manual_seed(1)
    return load_clip(register_tiny(), pretrained=None)


def tiny_tower(image_size=32, *, seed=2, **kwargs):
    """A fresh open_clip VisionTransformer: patch 8, width 64, 2 heads, 3 blocks."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    cfg = dict(image_size=image_size, patch_size=8, width=64, layers=3, heads=2, mlp_ratio=4.0,
               output_dim=32)
    cfg.update(kwargs)
    return VisionTransformer(**cfg).eval()


class FakeDino(torch.nn.Module):
    """DINO hub-style ViT stand-in: ``get_intermediate_layers`` returns [B, 1 + N, C] tokens."""

    def __init__(self, patch=4, dim=16):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.patch_size = patch
        self.proj = torch.nn.Conv2d(3, dim, patch, patch)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.seen = None

    def get_intermediate_layers(self, x, n=1):
        self.seen = x
        t = self.proj(x).flatten(2).transpose(1, 2)
        return [torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)]
