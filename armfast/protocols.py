"""Inference protocols per (baseline, dataset), as the baselines' public configs set them.

Each baseline has defaults (its segmentor's constructor) and per-dataset overrides (its
``configs/cfg_<dataset>.py``): the short side images are resized to, the sliding-window crop
and stride, the cosine-logit scale, and, on datasets with a background class, the probability
under which a pixel becomes background. SCLIP's VOC21 config also sets ``area_thd`` (classes
covering less than that fraction of the image are dropped).

vanilla and maskclip have no configs of their own; they run under SCLIP's harness, which
evaluates them in its paper.

A protocol may also set options of the baseline itself (``baseline_options``, passed to
`armfast.clip.extract`): ResCLIP's configs set its RCS weight lambda per dataset.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Protocol:
    short_side: int  # resize so that min(H, W) == short_side (keep ratio); 0: keep the size
    crop: int  # sliding-window size; 0: the whole image in one pass
    stride: int  # sliding-window stride
    logit_scale: float  # softmax temperature on cosine logits
    prob_thd: float = 0.0  # pixels whose best probability is below become class 0
    area_thd: float | None = None  # drop classes covering < area_thd of the image (SCLIP VOC21)
    source: str = ""  # where the numbers come from
    # keyword options of the baseline's last block, as (name, value) pairs (hashable)
    baseline_options: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        for name, least in (("short_side", 0), ("crop", 0), ("stride", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                kind = "a positive integer" if least else "a positive integer or 0 (off)"
                raise ValueError(f"{name} must be {kind}, got {v!r}")
        if self.crop and self.stride > self.crop:
            raise ValueError(f"stride {self.stride} is larger than crop {self.crop}: the pixels "
                             f"between the sliding windows would never be covered (stride <= crop)")
        if isinstance(self.logit_scale, bool) or not isinstance(self.logit_scale, (int, float)) \
                or not math.isfinite(self.logit_scale) or self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be a finite number > 0, got {self.logit_scale!r}")
        if not 0.0 <= self.prob_thd <= 1.0:
            raise ValueError(f"prob_thd must be in [0, 1], got {self.prob_thd}")
        if self.area_thd is not None and not 0.0 <= self.area_thd < 1.0:
            raise ValueError(f"area_thd must be in [0, 1) or None, got {self.area_thd}")
        if isinstance(self.baseline_options, dict):
            object.__setattr__(self, "baseline_options", tuple(self.baseline_options.items()))
        if not all(isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str)
                   for o in self.baseline_options):
            raise ValueError(f"baseline_options must be (name, value) pairs or a dict, got "
                             f"{self.baseline_options!r}")

    def to_dict(self) -> dict:
        return asdict(self)


DATASET_NAMES = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff164k",
                 "cityscapes", "ade20k")

_SCLIP = "SCLIP configs (wangf3014/SCLIP)"
_BASE = {
    "sclip": Protocol(336, 224, 112, 40.0, source=_SCLIP),
    "naclip": Protocol(336, 224, 112, 40.0, source="NACLIP configs (sinahmr/NACLIP)"),
    "clearclip": Protocol(448, 448, 224, 50.0, source="ClearCLIP configs (mc-lan/ClearCLIP)"),
    "proxyclip": Protocol(336, 336, 112, 40.0, source="ProxyCLIP configs (mc-lan/ProxyCLIP), CLIP-B/16 values"),
}
_BASE["vanilla"] = replace(_BASE["sclip"], source=_SCLIP + ", vanilla under SCLIP's harness")
_BASE["maskclip"] = replace(_BASE["sclip"], source=_SCLIP + ", MaskCLIP under SCLIP's harness")
# segmentor defaults of each repo (mmseg Resize scale=(2048, S): short side S)
_BASE["scclip"] = Protocol(336, 224, 112, 40.0, source="SC-CLIP configs (SuleBai/SC-CLIP @ 0417ba9)")
_BASE["sfp"] = Protocol(336, 224, 112, 40.0, source="SFP configs (Kimsure/SFP @ 2804f5b, SFP_ICCV)")
_BASE["resclip"] = Protocol(336, 224, 112, 40.0, baseline_options=(("rcs_lambda", 0.3),),
                            source="ResCLIP configs (yvhangyang/ResCLIP @ 0e085f7), RCS weights "
                                   "[tau 2.0, lambda] per dataset")

_SCLIP_OVERRIDES = {
    "voc21": dict(logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
    "context60": dict(logit_scale=50.0, prob_thd=0.1),
    "coco_object": dict(logit_scale=50.0, prob_thd=0.1),
    "coco_stuff164k": dict(short_side=448),
    "cityscapes": dict(short_side=560),
}
_OVERRIDES: dict[str, dict[str, dict]] = {
    "sclip": _SCLIP_OVERRIDES,
    "vanilla": _SCLIP_OVERRIDES,
    "maskclip": _SCLIP_OVERRIDES,
    "naclip": {
        "voc21": dict(prob_thd=0.1),
        "context60": dict(prob_thd=0.1),
        "coco_object": dict(prob_thd=0.1),
        "coco_stuff164k": dict(short_side=448),
        "cityscapes": dict(short_side=560),
    },
    "clearclip": {
        "voc21": dict(prob_thd=0.5),
        "context60": dict(prob_thd=0.15),
        "coco_object": dict(prob_thd=0.4),
        "cityscapes": dict(crop=224),
    },
    "proxyclip": {
        "voc21": dict(prob_thd=0.1),
        "context60": dict(prob_thd=0.05),
        "coco_object": dict(prob_thd=0.1),
        "cityscapes": dict(short_side=448, crop=224),
    },
}

_SCCLIP_OVERRIDES = {  # SC-CLIP's cfg_<dataset>.py; SFP's are the same but for ADE20K
    "voc21": dict(logit_scale=50.0, prob_thd=0.15, area_thd=0.1),
    "context60": dict(prob_thd=0.15),
    "coco_object": dict(logit_scale=55.0, prob_thd=0.35),
    "cityscapes": dict(short_side=560),
}
_OVERRIDES["scclip"] = _SCCLIP_OVERRIDES
_OVERRIDES["sfp"] = {**_SCCLIP_OVERRIDES, "ade20k": dict(short_side=384)}


def _rcs(lam: float) -> tuple[tuple[str, float], ...]:
    return (("rcs_lambda", lam),)


_OVERRIDES["resclip"] = {  # its cfg_<dataset>.py: attn_rcs_weights = [2.0, lambda]
    "voc21": dict(prob_thd=0.1, crop=0),
    "context60": dict(prob_thd=0.1),
    "coco_object": dict(prob_thd=0.1, baseline_options=_rcs(0.4)),
    "voc20": dict(crop=0, baseline_options=_rcs(0.6)),
    "context59": dict(baseline_options=_rcs(0.4)),
    "coco_stuff164k": dict(baseline_options=_rcs(0.4)),
    "cityscapes": dict(short_side=560, baseline_options=_rcs(0.2)),
}

PROTOCOLS: dict[tuple[str, str], Protocol] = {
    (b, d): replace(base, **_OVERRIDES[b].get(d, {}))
    for b, base in _BASE.items() for d in DATASET_NAMES
}


def base_protocol(baseline: str) -> Protocol:
    """A baseline's own defaults (its segmentor's constructor values), before any dataset
    config: what it runs on images outside the benchmarks."""
    key = str(baseline).lower()
    if key not in _BASE:
        raise ValueError(f"no protocol for baseline {baseline!r} (known: {', '.join(sorted(_BASE))})")
    return _BASE[key]


def get_protocol(baseline: str, dataset: str, **overrides) -> Protocol:
    """The published protocol of `baseline` on `dataset`, with optional field overrides."""
    from .data import get_dataset_class

    dataset = get_dataset_class(dataset).name  # resolves aliases, rejects unknown names
    key = (str(baseline).lower(), dataset)
    if key not in PROTOCOLS:
        known = sorted({b for b, _ in PROTOCOLS})
        raise ValueError(f"no protocol for baseline {baseline!r} (known: {', '.join(known)}) "
                         f"on dataset {dataset!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(PROTOCOLS[key], **overrides) if overrides else PROTOCOLS[key]
