"""CLIP loading and feature extraction for ARM: shallow tokens and a baseline's deep features.

`extract` runs open_clip's ``VisionTransformer`` from its parameter names (``conv1``,
``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks``,
``ln_post``, ``proj``) rather than its forward, so that the positional embedding follows each
crop's grid, every block's attention goes through `armfast.ops.attention`, and the last block
can be replaced by a training-free baseline (`armfast.clip.baselines`).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import ALIASES, BackboneSpec, canonical_name, find_backbone
from .baselines import LastBlockInput, check_options, get_baseline, run_baseline
from .blocks import (block_forward, forward_with_attention, require_standard_block,
                     transformer_batch_first)
from .vfm import as_vfm

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP preprocessing
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SHALLOW_LAYERS = (4, 6, 8)  # ViT-B/16's; other depths: `default_shallow_layers`


# ----------------------------------------------------------------------------- loading

def _is_known_tag(name: str, tag: str) -> bool:
    import open_clip

    return tag.lower() in {t.lower() for t in open_clip.list_pretrained_tags_by_model(name)}


def _tag_needs_quick_gelu(name: str, tag: str) -> bool:
    from open_clip.pretrained import get_pretrained_cfg

    return bool(get_pretrained_cfg(name, tag).get("quick_gelu", False))


class _OpenClipNotices(logging.Filter):
    """Drops open_clip's log records under ERROR (its root-logger "Model initialized randomly"
    when random weights are what was asked for)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "open_clip" not in record.pathname


@contextlib.contextmanager
def _quiet_open_clip(active: bool):
    root = logging.getLogger()
    quiet = _OpenClipNotices()
    if active:
        root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def load_clip(name: str = "ViT-B-16", pretrained: str | os.PathLike | None = None,
              device: str | torch.device = "cpu", *, quick_gelu: bool | None = None) -> nn.Module:
    """An open_clip CLIP model (with ``.visual``), frozen and in eval mode.

    Args:
        name: open_clip model config, e.g. ``"ViT-B-16"`` (OpenAI's ``"ViT-B/16"``,
            ``"ViT-L/14@336px"`` are accepted for the registered backbones, see
            `armfast.backbones`).
        pretrained: ``None`` for random weights (tests); an open_clip tag such as ``"openai"``
            (fetched through open_clip's own cache); or a local checkpoint file (safetensors
            preferred; other files load with ``weights_only=True``).
        device: where the model goes.
        quick_gelu: build with QuickGELU. ``None`` follows the tag: OpenAI weights were trained
            with QuickGELU, so ``("ViT-B-16", "openai")`` builds ``ViT-B-16``'s QuickGELU variant.
            For a checkpoint *file* of OpenAI weights pass ``True`` (or name the
            ``-quickgelu`` config); a file cannot say which activation it was trained with.
    """
    import open_clip

    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be an open_clip model name, got {name!r}")
    name = ALIASES.get(name, name)
    if ":" not in name and name not in open_clip.list_models():  # 'local-dir:'/'hf-hub:' pass
        raise ValueError(f"name must be an open_clip model (open_clip.list_models()), got {name!r}")
    preprocess = {}
    if pretrained is not None:
        if isinstance(pretrained, str) and _is_known_tag(name, pretrained):
            from .weights import pretrained_file, preprocess_fields, tag_config

            if quick_gelu is None:
                quick_gelu = _tag_needs_quick_gelu(name, pretrained)
            # the tag's file, from a cache or downloaded here: offline, this fails in seconds
            # saying how to run offline, where open_clip would retry the Hub for ~50 s
            preprocess = preprocess_fields(tag_config(name, pretrained.lower()))
            pretrained = pretrained_file(name, pretrained.lower())
        else:
            path = Path(pretrained)
            if not path.is_file():
                known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
                raise FileNotFoundError(
                    f"pretrained: no CLIP weights file at {str(path)!r}, and not an open_clip tag "
                    f"for {name} (tags: {known})")
            pretrained = str(path)
    with _quiet_open_clip(pretrained is None):
        model = open_clip.create_model(name, pretrained=pretrained, device=device,
                                       force_quick_gelu=bool(quick_gelu),
                                       force_preprocess_cfg=preprocess or None)
    model.eval().requires_grad_(False)  # CLIP stays frozen everywhere in armfast
    model.armfast_name = name  # read by the text side to pick the tokenizer
    return model


def backbone_of(model: nn.Module) -> BackboneSpec | None:
    """The registered backbone (`armfast.backbones`) of a CLIP: from the name `load_clip` gave
    it, else from its architecture (patch, native size, width, depth, output dim); None for
    other models (test models, local configs)."""
    from ..backbones import BACKBONES

    for obj in (model, getattr(model, "visual", None)):
        name = canonical_name(getattr(obj, "armfast_name", None))
        if name is not None:
            return BACKBONES[name]
    visual = vision_tower(model)
    ph, _ = patch_size(visual)
    return find_backbone(patch_size=ph, image_size=native_grid(visual)[0] * ph,
                         width=visual.conv1.out_channels, layers=len(visual.transformer.resblocks),
                         embed_dim=output_dim(visual))


def backbone_label(model: nn.Module) -> str:
    """A name for messages: the registered backbone, else the name `load_clip` was given."""
    spec = backbone_of(model)
    if spec is not None:
        return spec.name
    name = getattr(model, "armfast_name", None) or getattr(getattr(model, "visual", None),
                                                          "armfast_name", None)
    return f"{name!r} (not a registered backbone)" if name else "an unregistered CLIP"


def output_dim(model: nn.Module) -> int:
    """E, the dim of the deep features (after ``proj``) and of the text embeddings."""
    visual = vision_tower(model)
    return int(visual.proj.shape[1]) if visual.proj is not None else int(visual.conv1.out_channels)


def default_shallow_layers(model: nn.Module) -> tuple[int, ...]:
    """ARM's shallow layers for this CLIP: the registered backbone's, else blocks at 1/3, 1/2
    and 2/3 of the depth (``(4, 6, 8)`` for 12 blocks), kept below the last block."""
    spec = backbone_of(model)
    if spec is not None:
        return spec.shallow_layers
    depth = len(vision_tower(model).transformer.resblocks)
    layers = (depth // 3, depth // 2, 2 * depth // 3)
    return tuple(dict.fromkeys(min(i, max(depth - 2, 0)) for i in layers))


def arm_mismatch(config, *, backbone: str | None, width: int, embed_dim: int, depth: int,
                 clip_label: str) -> str | None:
    """Why an ARM (its `ARMConfig`) cannot run on a CLIP of this geometry (another registered
    backbone, width, output dim, or shallow layers past the depth); None when it fits."""
    arm_name = canonical_name(config.backbone)
    problems = []
    if backbone is not None and arm_name is not None and backbone != arm_name:
        problems.append(f"backbone {arm_name} != {backbone}")
    if config.width != width:
        problems.append(f"width {config.width} != {width}")
    if config.embed_dim != embed_dim:
        problems.append(f"embed dim {config.embed_dim} != {embed_dim}")
    if max(config.shallow_layers) >= depth - 1 or min(config.shallow_layers) < 0:
        problems.append(f"shallow layers {tuple(config.shallow_layers)} are not blocks 0..{depth - 2} "
                        f"of a {depth}-block tower")
    if not problems:
        return None
    return (f"arm was trained for backbone {config.backbone} (width {config.width}, embed dim "
            f"{config.embed_dim}, shallow layers {tuple(config.shallow_layers)}) but is plugged "
            f"into {clip_label} (width {width}, embed dim {embed_dim}, {depth} blocks): "
            f"{'; '.join(problems)}. Load the CLIP the ARM was trained with, or train an ARM for "
            f"{clip_label}.")


def check_arm_matches(config, model: nn.Module) -> None:
    """Raises ValueError, naming both backbones, when an ARM (its `ARMConfig`) was built for
    another CLIP than `model` (see `arm_mismatch`)."""
    visual = vision_tower(model)
    spec = backbone_of(model)
    problem = arm_mismatch(config, backbone=spec.name if spec else None,
                           width=visual.conv1.out_channels, embed_dim=output_dim(visual),
                           depth=len(visual.transformer.resblocks), clip_label=backbone_label(model))
    if problem:
        raise ValueError(problem)


# ----------------------------------------------------------------------------- vision tower

def vision_tower(model: nn.Module) -> nn.Module:
    """``model.visual`` (or the model itself when it is the tower), checked to be a ViT whose
    parameters `extract` knows."""
    visual = getattr(model, "visual", model)
    missing = [n for n in ("conv1", "class_embedding", "positional_embedding", "ln_pre",
                           "transformer", "ln_post", "proj") if not hasattr(visual, n)]
    if missing:
        raise TypeError(f"model must be an open_clip CLIP with a VisionTransformer tower; "
                        f"{type(visual).__name__} has no {', '.join(missing)}")
    if getattr(visual, "attn_pool", None) is not None:
        raise TypeError("model: vision towers with attentional pooling (CoCa) are not supported")
    return visual


def patch_size(model: nn.Module) -> tuple[int, int]:
    k = vision_tower(model).conv1.kernel_size
    return (int(k[0]), int(k[1]))


def native_grid(model: nn.Module) -> tuple[int, int]:
    """The patch grid the positional embedding was trained on (14 x 14 for ViT-B/16 at 224)."""
    visual = vision_tower(model)
    grid = getattr(visual, "grid_size", None)
    if grid is not None:
        return (int(grid[0]), int(grid[1]))
    n = visual.positional_embedding.shape[0] - 1
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"model: cannot infer the native grid of {n} positional embeddings")
    return (side, side)


def image_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model's images are normalised with (OpenAI's unless it says otherwise)."""
    visual = vision_tower(model)
    mean = getattr(visual, "image_mean", None) or OPENAI_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def interpolate_pos_embed(pos_embed: Tensor, native: Sequence[int], grid: Sequence[int]) -> Tensor:
    """``[1 + H0*W0, W]`` -> ``[1 + h*w, W]``: the patch part resized bicubically to exactly
    ``grid`` (``align_corners=False``, no antialiasing, as open_clip and timm resize
    checkpoints), the class position kept. The native grid returns the embedding unchanged.

    SCLIP/NACLIP call ``F.interpolate`` with ``scale_factor=(g + 0.1) / 14`` (the DINO idiom),
    which samples up to ~0.07 patch away from these positions; the exact size is used here."""
    native, grid = tuple(int(g) for g in native), tuple(int(g) for g in grid)
    if pos_embed.dim() != 2 or pos_embed.shape[0] != native[0] * native[1] + 1:
        raise ValueError(f"pos_embed must be [1 + {native[0]}*{native[1]}, W], got "
                         f"{tuple(pos_embed.shape)}")
    if grid == native:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:]
    patch_pos = patch_pos.float().reshape(1, *native, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([cls_pos, patch_pos.to(pos_embed.dtype)], dim=0)


def _check_images(visual: nn.Module, images) -> tuple[int, int]:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or 0 in images.shape:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be CLIP-normalised floats, got dtype {images.dtype}")
    ph, pw = (int(k) for k in visual.conv1.kernel_size)
    H, W = images.shape[-2:]
    if H % ph or W % pw:
        raise ValueError(f"images height and width must be multiples of the patch size "
                         f"{ph}x{pw}, got {H}x{W}")
    return H // ph, W // pw


def embed(model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Tokens entering the first block, ``[B, 1 + h*w, W]`` (class token first), and the grid:
    patch embedding, class token, positional embedding interpolated to the grid, ``ln_pre``."""
    visual = vision_tower(model)
    grid = _check_images(visual, images)
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, W, h, w]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_pos_embed(visual.positional_embedding, native_grid(visual), grid).to(x.dtype)
    return visual.ln_pre(x), grid


def feature_grid(model: nn.Module, image_size: Sequence[int], baseline: str = "vanilla",
                 vfm=None) -> tuple[int, int]:
    """The (h, w) grid of `extract`'s deep features for crops of ``image_size = (H, W)``:
    CLIP's patch grid, or the VFM's for proxyclip."""
    H, W = (int(s) for s in image_size)
    if get_baseline(baseline).needs_vfm:
        return as_vfm(vfm).grid(H, W)
    ph, pw = patch_size(model)
    return H // ph, W // pw


def _check_layers(shallow_layers, depth: int) -> tuple[int, ...]:
    if isinstance(shallow_layers, (int, str)) or not isinstance(shallow_layers, Sequence):
        raise TypeError(f"shallow_layers must be a sequence of block indices, got {shallow_layers!r}")
    layers = tuple(shallow_layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth - 1:
            raise ValueError(f"shallow_layers must hold 0-based block indices in [0, {depth - 2}] "
                             f"(the last block belongs to the baseline), got {layers}")
    return layers


def resample_tokens(tokens: Tensor, grid: Sequence[int], new_grid: Sequence[int]) -> Tensor:
    """Patch tokens ``[B, h*w, C]`` resampled bilinearly to ``[B, h'*w', C]``."""
    if tuple(grid) == tuple(new_grid):
        return tokens
    maps = tokens.transpose(1, 2).unflatten(-1, tuple(grid))
    maps = F.interpolate(maps, size=tuple(new_grid), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2)


def extract(model: nn.Module, images: Tensor, *, baseline: str = "vanilla",
            shallow_layers: Sequence[int] | None = None, backend: str = "auto",
            vfm=None, baseline_options=None) -> tuple[list[Tensor], Tensor]:
    """Shallow tokens and a baseline's deep patch features, ARM's two inputs.

    Args:
        model: an open_clip CLIP (or its ``.visual``), e.g. from `load_clip`.
        images: CLIP-normalised crops ``[B, 3, H, W]``, H and W multiples of the patch size
            (any size: the positional embedding is interpolated to the crop's grid).
        baseline: how the last block is run, one of `armfast.clip.BASELINES`.
        shallow_layers: 0-based blocks whose outputs are returned as shallow tokens; None:
            the backbone's default (`default_shallow_layers`, ``(4, 6, 8)`` for ViT-B/16).
        backend: `armfast.ops` backend for the attention products.
        vfm: proxyclip's vision foundation model (an object or a checkpoint path).
        baseline_options: keyword options of the baseline (e.g. ``{"rcs_lambda": 0.4}`` for
            resclip, as its per-dataset protocol sets it); None: its defaults.

    Returns:
        ``(shallow, deep)``: ``shallow`` a list of ``[B, N, W]`` patch tokens (class token
        dropped), one per shallow layer; ``deep`` the ``[B, N, E]`` baseline features after
        ``ln_post`` and ``proj``. For proxyclip N is the VFM's grid and the shallow tokens are
        resampled bilinearly to it (see `feature_grid`).
    """
    visual = vision_tower(model)
    spec = get_baseline(baseline)
    blocks = visual.transformer.resblocks
    if shallow_layers is None:
        shallow_layers = default_shallow_layers(visual)
    layers = _check_layers(shallow_layers, len(blocks))
    options = check_options(spec.name, baseline_options)
    hidden_blocks, attention_blocks = spec.blocks(len(blocks))
    vfm = as_vfm(vfm) if spec.needs_vfm else None
    batch_first = transformer_batch_first(visual.transformer)

    x, grid = embed(visual, images)
    shallow, hidden, attention = {}, {}, {}
    for i, block in enumerate(blocks[:-1]):
        if i in attention_blocks:
            require_standard_block(block, f"baseline {spec.name!r} (attention maps of block {i})")
            x, attention[i] = forward_with_attention(block, x)
        else:
            x = block_forward(block, x, batch_first=batch_first, backend=backend)
        if i in layers:
            shallow[i] = x[:, 1:]
        if i in hidden_blocks:
            hidden[i] = x
    mean, std = image_stats(visual)
    inp = LastBlockInput(x=x, grid=grid, images=images, image_mean=mean, image_std=std,
                         backend=backend, vfm=vfm, batch_first=batch_first, hidden=hidden,
                         attention=attention, depth=len(blocks))
    tokens, deep_grid = run_baseline(spec.name, blocks[-1], inp, options)
    deep = visual.ln_post(tokens)
    if visual.proj is not None:
        deep = deep @ visual.proj
    return [resample_tokens(shallow[i], grid, deep_grid) for i in layers], deep
