"""`armfast.segment`: one call from an image and class names to a segmentation.

    import armfast
    result = armfast.segment("street.jpg", ["road", "car", "person", "sky"])
    result.save("street.png")          # palette PNG of class indices
    result.save("street_overlay.jpg")  # photo + colour map + legend

It runs the benchmark path with the default preset of the baseline on the backbone
(`armfast.presets.default_preset`: resizing, sliding windows, logit scale), so an image of
your own is segmented the way the benchmarks are. The CLIP model is loaded once per
(backbone, weights, device) and kept for the next call.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from .inference.config import SegmentorConfig

# (backbone, pretrained, device) -> loaded CLIP; weights stay in memory until clear_clip_cache()
_CLIP_CACHE: dict[tuple, nn.Module] = {}
_LOCK = threading.Lock()

DEFAULT_BACKBONE = "ViT-B-16"
PROTOCOL_FIELDS = ("short_side", "crop", "stride", "logit_scale", "area_thd")  # preset overrides


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_clip(backbone: str = DEFAULT_BACKBONE, pretrained: Optional[str] = "openai",
             device=None) -> nn.Module:
    """`armfast.clip.load_clip(backbone, pretrained, device)`, cached in this process."""
    from .backbones import canonical_name
    from .clip import load_clip

    device = torch.device(device) if device is not None else default_device()
    name = canonical_name(backbone) or backbone  # "ViT-B/16" and "ViT-B-16" are one model
    key = (name, None if pretrained is None else str(pretrained), str(device))
    with _LOCK:
        model = _CLIP_CACHE.get(key)
        if model is None:
            model = load_clip(name, pretrained, device)
            _CLIP_CACHE[key] = model
    return model


def clear_clip_cache() -> None:
    """Drops the CLIP models `segment` keeps between calls."""
    with _LOCK:
        _CLIP_CACHE.clear()


def segment(image, classes, baseline: Optional[str] = None, arm=None, *,
            config: Optional[SegmentorConfig] = None, backbone: Optional[str] = None,
            pretrained: Optional[str] = "openai", clip=None, device=None, vfm=None,
            prob_thd: Optional[float] = None, **overrides):
    """Segments one image into `classes`; returns a `armfast.inference.result.SegmentationResult`.

    Args:
        image: a path, a PIL image, an ``HxWx3`` uint8 array or a ``[3, H, W]`` tensor.
        classes: class names; a list per class for synonyms (``["cat", ["person", "people"]]``).
        baseline: vanilla, maskclip, sclip (default), clearclip, naclip, proxyclip (needs
            ``vfm``), scclip, sfp or resclip; the `SegmentorConfig` field.
        arm: an `armfast.ARM` or its ``save_pretrained`` directory; it must have been trained
            for this backbone.
        config, **overrides: a `SegmentorConfig` and its fields (``background``,
            ``templates``, ``backend``, ``short_side``, ``crop``, ``stride``, ``logit_scale``,
            ``area_thd``, ``precision``, ``crop_batch_size``, ``max_memory``,
            ``cuda_graphs``). ``background`` is `armfast.background.Background` or a spec:
            ``"none"`` (default), ``"thd:0.3"``, ``"words"`` (SCLIP's background set),
            ``"words:sky,wall"``, ``"words:sky,wall+thd:0.2"``; any rule but none adds a class
            "background" at index 0, before `classes`. Without a ``protocol`` the preset's is
            used.
        backbone: open_clip model name (``"ViT-B-16"`` unless ``clip`` is given; also
            ``"ViT-B-32"``, ``"ViT-L-14"``, ``"ViT-L-14-336"``, OpenAI's ``"ViT-B/16"`` names).
        pretrained: open_clip weights tag or a weights file; None for random weights.
        clip: an already loaded CLIP to use instead (then ``backbone``/``pretrained`` are not
            used to load one; a ``backbone`` that differs from the model's is an error).
        device: where to run (default: CUDA when available, else CPU; ``clip``'s device).
        vfm: proxyclip's vision foundation model.
        prob_thd: the preset's protocol field: a ``thd:p`` background, or the threshold of a
            words background.
    """
    from .arm import load_arm
    from .clip.model import backbone_of
    from .inference.config import make_config
    from .inference.segmentor import Segmentor
    from .presets import get_preset, warn_preset

    if baseline is not None:
        overrides["baseline"] = baseline
    config = make_config(config, overrides)
    if isinstance(classes, (list, tuple)):  # a name in two classes: the second never wins
        from .clip.text import normalize_classes
        from .data.classnames import check_unique

        check_unique(normalize_classes(classes), "classes")
    arm = load_arm(arm)  # before loading CLIP: a wrong path fails fast
    if clip is None:
        model = get_clip(backbone or DEFAULT_BACKBONE, pretrained, device)
    else:
        from .backbones import canonical_name
        from .clip.model import backbone_label

        model = clip
        spec = backbone_of(model)
        if backbone is not None and spec is not None and canonical_name(backbone) != spec.name:
            raise ValueError(f"backbone {backbone!r} does not match the given clip, a "
                             f"{backbone_label(model)}; leave backbone out when passing clip")
        if device is not None:
            model = model.to(device)
    spec = backbone_of(model)  # an unregistered CLIP gets ViT-B/16's preset: the same protocol
    preset = get_preset(config.baseline, None, spec.name if spec else DEFAULT_BACKBONE,
                        background=config.background, prob_thd=prob_thd,
                        **{k: getattr(config, k) for k in PROTOCOL_FIELDS})
    warn_preset(preset)
    config = config.replace(protocol=config.protocol or preset.protocol,
                            background=preset.background)
    return Segmentor(model, classes, config, arm=arm, vfm=vfm).segment(image)
