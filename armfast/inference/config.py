"""`SegmentorConfig`: every setting of a `Segmentor` besides its models and its classes, and
how those settings resolve against a protocol into the values a run uses (`resolve`).

`armfast.Segmentor`, `armfast.eval.evaluate` and `armfast.segment` take one, and the same
field names as keyword overrides.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, Union

from ..background import Background, BackgroundLike, parse_background
from ..precision import check_precision
from ..presets import default_preset

Size = Union[int, Sequence[int], None]
Pair = Optional[tuple[int, int]]


@dataclass(frozen=True)
class SegmentorConfig:
    """The settings of a `Segmentor` (see `armfast.inference.segmentor` for the protocol).

    Args:
        baseline: the last-block rewrite, see `armfast.clip.BASELINES`.
        protocol: any object with ``short_side``, ``crop``, ``stride``, ``logit_scale`` (and
            optionally ``prob_thd``, ``area_thd``) attributes, e.g. `armfast.protocols.Protocol`;
            the fields below override it. None: the baseline's default preset for the CLIP's
            backbone (`armfast.presets.default_preset`).
        short_side, crop, stride: resizing and sliding window (ints or (h, w));
            ``short_side=0`` keeps the image size, ``crop=0`` runs the whole image at once.
        logit_scale: softmax temperature on cosine logits without ARM (ARM brings its own tau).
        area_thd: SCLIP's VOC21 rule: classes covering less than this fraction of the image
            are dropped before the argmax.
        background: the background rule, a `Background` or a spec parsed by
            `armfast.background.parse_background` (``"none"``, ``"thd:0.3"``,
            ``"words:sky,wall"``, ``"words+thd:0.1"``); a rule from a spec adds a class
            "background" at index 0. None: the protocol's ``prob_thd`` sends pixels to class 0
            of the class list (a benchmark class file, whose class 0 is its background).
        templates: prompt templates for class names ('openai' = the 80 ImageNet ones).
        backend: `armfast.ops` backend.
        precision: ``"auto"`` (bf16 autocast on CUDA, float32 elsewhere), ``"bf16"``,
            ``"fp16"`` or ``"fp32"``; softmax statistics and logits stay float32
            (`armfast.precision`).
        crop_batch_size: crops per forward pass; None: as many as ``max_memory`` allows (at
            most `armfast.inference.crop_budget.MAX_CROPS`).
        max_memory: the memory a crop batch may take, bytes or a string such as ``"4GiB"``;
            None: half the GPU's free memory, 2 GiB on CPU (`armfast.inference.crop_budget`).
        cuda_graphs: replay the crop forward (CLIP, the baseline's last block, ARM, logits)
            from CUDA graphs, one per crop-batch shape (`armfast.inference.graphs`); None: on
            for CUDA models unless the baseline runs a VFM (arbitrary code). Each graph is
            checked against the eager call once, and a mismatch turns graphs off with a warning.
    """

    baseline: str = "sclip"
    protocol: Any = None
    short_side: Size = None
    crop: Size = None
    stride: Size = None
    logit_scale: Optional[float] = None
    area_thd: Optional[float] = None
    background: BackgroundLike = None
    templates: Any = "openai"
    backend: str = "auto"
    precision: str = "auto"
    crop_batch_size: Optional[int] = None
    max_memory: Union[int, str, None] = None
    cuda_graphs: Optional[bool] = None

    def __post_init__(self):
        object.__setattr__(self, "precision", check_precision(self.precision))
        if self.background is not None:
            object.__setattr__(self, "background", parse_background(self.background))
        if self.templates is None:
            object.__setattr__(self, "templates", "openai")
        n = self.crop_batch_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"crop_batch_size must be a positive int or None, got {n!r}")

    def replace(self, **changes) -> "SegmentorConfig":
        """A copy with some fields changed; a name that is not a field is a TypeError."""
        unknown = sorted(set(changes) - FIELDS)
        if unknown:
            raise TypeError(f"unknown SegmentorConfig field(s) {', '.join(unknown)}; the fields "
                            f"are {', '.join(f.name for f in fields(SegmentorConfig))}")
        return dataclasses.replace(self, **changes) if changes else self


FIELDS = frozenset(f.name for f in fields(SegmentorConfig))


def make_config(config: Optional[SegmentorConfig], overrides: dict) -> SegmentorConfig:
    """`config` (None: the defaults) with keyword `overrides` of its fields."""
    if config is None:
        config = SegmentorConfig()
    elif not isinstance(config, SegmentorConfig):
        raise TypeError(f"config must be a SegmentorConfig or None, got {type(config).__name__}")
    return config.replace(**overrides)


@dataclass(frozen=True)
class Resolved:
    """The protocol values a run uses: sizes as (h, w) pairs (None: off) and the background."""

    short_side: Pair
    crop: Pair
    stride: Pair
    logit_scale: float
    area_thd: Optional[float]
    background: Background
    baseline_options: tuple = ()  # the protocol's (name, value) options of the baseline


def _pair(name: str, v) -> Pair:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 0):
        return None
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in t):
        raise ValueError(f"{name} must be a positive int, a (height, width) pair, or 0/None "
                         f"for off; got {v!r}")
    return t


def resolve(config: SegmentorConfig, backbone: Optional[str]) -> Resolved:
    """The protocol of `config` (its own, else the baseline's default preset on `backbone`),
    its fields overriding, checked; and the background rule."""
    protocol = config.protocol
    if protocol is None:
        protocol = default_preset(config.baseline, backbone).protocol
    missing = [k for k in ("short_side", "crop", "stride", "logit_scale")
               if not hasattr(protocol, k)]
    if missing:
        raise TypeError(f"protocol must have short_side, crop, stride and logit_scale "
                        f"attributes; {type(protocol).__name__} has no {', '.join(missing)}")
    values = {k: getattr(protocol, k, None) for k in
              ("short_side", "crop", "stride", "logit_scale", "area_thd")}
    values.update({k: getattr(config, k) for k in values if getattr(config, k) is not None})
    short_side = _pair("short_side", values["short_side"])
    if short_side is not None and short_side[0] != short_side[1]:
        raise ValueError(f"short_side must be one int, got {values['short_side']!r}")
    crop = _pair("crop", values["crop"])
    stride = _pair("stride", values["stride"]) if crop is not None else None
    if crop is not None and stride is None:
        raise ValueError("stride must be set when crop is")
    if crop is not None and any(s > c for s, c in zip(stride, crop)):
        raise ValueError(f"stride {values['stride']!r} is larger than crop {values['crop']!r}: "
                         f"the pixels between the sliding windows would never be covered "
                         f"(stride <= crop)")
    logit_scale = float(values["logit_scale"])
    if not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale}")
    area_thd = None if values["area_thd"] is None else float(values["area_thd"])
    if area_thd is not None and not 0.0 <= area_thd < 1.0:
        raise ValueError(f"area_thd must be in [0, 1) or None, got {area_thd}")
    background = config.background
    if background is None:  # the protocol's threshold, onto class 0 of the caller's list
        thd = float(getattr(protocol, "prob_thd", None) or 0.0)
        if not 0.0 <= thd <= 1.0:
            raise ValueError(f"prob_thd must be in [0, 1], got {thd}")
        background = (Background.threshold(thd, index=0, name=None) if thd > 0
                      else Background(index=0, name=None))
    options = tuple(getattr(protocol, "baseline_options", None) or ())
    return Resolved(short_side, crop, stride, logit_scale, area_thd, background, options)
