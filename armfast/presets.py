"""Named protocol presets: everything a benchmark number depends on, with the number itself.

A preset is one (baseline, dataset, backbone): the inference protocol of
`armfast.protocols` (short side, crop, stride, logit scale, ``area_thd``), the background
rule (`armfast.background.Background`), the class-name file, and the mIoU the baseline's paper
reports for it. ``dataset=None`` is the preset for images outside the benchmarks (what
`armfast.segment` and ``armfast segment`` use): the baseline's own defaults, no background.

Background rules, per dataset with a background class (class 0):

- VOC21, COCO-Object: background words (SCLIP's set, line 0 of its ``cls_voc21.txt`` and
  ``cls_coco_object.txt``; NACLIP ships SCLIP's dataset configs; ProxyCLIP's own
  ``cls_voc21.txt`` has the same words and its ``cls_coco_object.txt`` a shorter set; ClearCLIP's
  ``cls_voc21.txt`` has the single word "background") plus the config's ``prob_thd``;
- Context60: the word "background" plus ``prob_thd``.

The background becomes class 0 ("background") ahead of the dataset's other classes, so class
ids match the masks. The other datasets have no background class and no rule.

Expected numbers: ViT-B/16 with OpenAI weights, from the design contract (section 4), which
quotes the SCLIP, ClearCLIP and NACLIP papers; SC-CLIP's as issue 25 quotes them; ResCLIP's
(on NACLIP) from the tables of its official README (``figs/main_results_w.png`` and
``main_results_wo.png`` @ 0e085f7), which are RCS + SFR while armfast's resclip is RCS alone.
No published SFP figure was found (its official repo's own test log at 2804f5b records VOC21
61.4, not a paper number). Other backbones, weights and baselines have ``expected_miou=None``:
we could not check their published tables. ``measured_miou`` is armfast's own measurement of
the preset, None ("not measured") until one is recorded in `MEASURED_MIOU`. The protocols do not change
with the backbone: the baselines' code runs ViT-L/14 with the ViT-B/16 crop, stride, short side
and logit scale.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Optional

from .backbones import get_backbone
from .background import Background, SCLIP_BACKGROUND_WORDS, parse_background
from .protocols import DATASET_NAMES, Protocol, base_protocol, get_protocol

DEFAULT_BACKBONE = "ViT-B-16"

# ProxyCLIP's configs/cls_coco_object.txt, line 0
PROXYCLIP_COCO_OBJECT_WORDS = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk",
    "bed", "building", "cloud", "floor", "hill", "rail")

_SCLIP_WORDS = {"voc21": SCLIP_BACKGROUND_WORDS, "coco_object": SCLIP_BACKGROUND_WORDS,
                "context60": ("background",)}
BACKGROUND_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "sclip": _SCLIP_WORDS, "naclip": _SCLIP_WORDS, "vanilla": _SCLIP_WORDS, "maskclip": _SCLIP_WORDS,
    # SC-CLIP, SFP and ResCLIP ship SCLIP's cls_voc21 / cls_coco_object / cls_context60 line 0
    "scclip": _SCLIP_WORDS, "sfp": _SCLIP_WORDS, "resclip": _SCLIP_WORDS,
    # ClearCLIP's cls_coco_object.txt is not in our sources; SCLIP's set (its parent) is assumed
    "clearclip": {"voc21": ("background",), "coco_object": SCLIP_BACKGROUND_WORDS,
                  "context60": ("background",)},
    "proxyclip": {"voc21": SCLIP_BACKGROUND_WORDS, "coco_object": PROXYCLIP_COCO_OBJECT_WORDS,
                  "context60": ("background",)},
}

# mIoU (%) published for ViT-B/16 with OpenAI weights, in DATASET_NAMES order
_PUBLISHED = {
    "sclip": (59.1, 30.4, 30.5, 80.4, 34.2, 22.4, 32.2, 16.1),
    "clearclip": (51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7),
    "naclip": (58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4),
    "scclip": (64.6, 36.8, 37.7, 84.3, 40.1, 26.6, 41.0, 20.1),
    "resclip": (61.1, 33.5, 35.0, 86.0, 36.8, 24.7, 35.9, 18.0),
}
_CONTRACT = "as quoted by the design contract"
_PAPERS = {
    "sclip": f"SCLIP (Wang et al., ECCV 2024) {_CONTRACT}",
    "clearclip": f"ClearCLIP (Lan et al., ECCV 2024) {_CONTRACT}",
    "naclip": f"NACLIP (Hajimiri et al., WACV 2025) {_CONTRACT}",
    "scclip": "SC-CLIP (Bai et al.) ViT-B/16 as reported elsewhere and quoted by issue 25",
    "resclip": ("ResCLIP on NACLIP (Yang et al., CVPR 2025), its README's tables; that is RCS + "
                "SFR, armfast runs RCS alone, so expect less"),
}
EXPECTED_MIOU: dict[tuple[str, str, str], float] = {
    (b, d, DEFAULT_BACKBONE): v for b, values in _PUBLISHED.items()
    for d, v in zip(DATASET_NAMES, values)
}
# (baseline, dataset, backbone) -> mIoU (%) armfast measured under the preset; none yet: no
# dataset or CLIP weights were reachable where these presets were written
MEASURED_MIOU: dict[tuple[str, str, str], float] = {}
NO_PUBLISHED_FIGURE = {"sfp": "no published SFP figure found (the official repo's test log at "
                              "2804f5b records VOC21 61.4, not a paper number)"}
EXPECTED_PRETRAINED = "openai"  # the weights the published numbers were measured with


def _dataset_class(dataset: str):
    from .data import get_dataset_class

    return get_dataset_class(dataset)


@dataclass(frozen=True)
class Preset:
    name: str  # "sclip/voc21/ViT-B-16", or "sclip/ViT-B-16" for images outside the benchmarks
    baseline: str
    dataset: Optional[str]
    backbone: str
    protocol: Protocol
    background: Background
    classnames: Optional[str]  # class-name file (a dataset name or a path); None: the caller's
    expected_miou: Optional[float]  # published mIoU (%), None where we have no citable number
    source: str  # where the protocol and the number come from
    measured_miou: Optional[float] = None  # armfast's measurement (MEASURED_MIOU), None: not measured

    def classes(self) -> Optional[list[list[str]]]:
        """The classes to name (synonym lists), the background class excluded when the
        background rule adds it; None when the caller names the classes."""
        if self.classnames is None:
            return None
        from .data import load_class_names

        classes = load_class_names(self.classnames)
        if self.background.adds_class:
            del classes[self.background.index]
        return classes

    def to_dict(self) -> dict:
        return {"name": self.name, "baseline": self.baseline, "dataset": self.dataset,
                "backbone": self.backbone, "protocol": self.protocol.to_dict(),
                "background": self.background.describe(), "classnames": self.classnames,
                "expected_miou": self.expected_miou, "measured_miou": self.measured_miou,
                "source": self.source}

    def describe(self) -> str:
        """One line: every value the number depends on."""
        p = self.protocol
        parts = [f"short side {p.short_side or 'unchanged'}",
                 f"crop {p.crop}, stride {p.stride}" if p.crop else "whole image (no crops)",
                 f"logit_scale {p.logit_scale:g}", f"background {self.background.describe()}"]
        if p.area_thd is not None:
            parts.append(f"area_thd {p.area_thd:g}")
        parts += [f"{k} {v:g}" for k, v in p.baseline_options]
        parts.append(f"classes {self.classnames or 'given'}")
        parts.append("paper mIoU " + (f"{self.expected_miou:.1f}" if self.expected_miou is not None
                                      else "n/a"))
        if self.dataset is not None:
            parts.append("measured " + (f"{self.measured_miou:.1f}" if self.measured_miou is not None
                                        else "not measured"))
        return f"{self.name}: " + ", ".join(parts)


def _has_background(dataset: Optional[str]) -> Optional[bool]:
    return None if dataset is None else bool(_dataset_class(dataset).has_background)


def _background_for(baseline: str, dataset: Optional[str], prob_thd: float) -> Background:
    if _has_background(dataset):
        words = BACKGROUND_WORDS.get(baseline, _SCLIP_WORDS).get(dataset)
        if words is not None:
            return Background.from_words(words, prob_thd=prob_thd)
    if prob_thd <= 0:
        return Background()
    # images outside the benchmarks get a "background" class; a benchmark without one keeps its
    # classes and the pixels go to class 0 (check_preset says why that is rarely wanted)
    return Background.threshold(prob_thd, name="background" if dataset is None else None)


def _with_threshold(rule: Background, prob_thd: Optional[float]) -> Background:
    """A ``prob_thd`` override given with a background rule: added to a words rule, a threshold
    rule of its own for none; a threshold rule already has one."""
    if prob_thd is None or prob_thd == rule.prob_thd:
        return rule
    if rule.mode == "threshold":
        raise ValueError(f"give the threshold once: prob_thd={prob_thd} and a background rule "
                         f"with prob_thd {rule.prob_thd}")
    if rule.mode == "words":
        return replace(rule, prob_thd=prob_thd)
    return Background.threshold(prob_thd, index=rule.index, name=rule.name) if prob_thd > 0 else rule


def _fit_background(rule: Background, dataset: Optional[str]) -> Background:
    """A dataset's classes are fixed by its masks: without a background class, a rule cannot
    add one and targets an existing class instead."""
    if _has_background(dataset) is False and rule.adds_class:
        return rule.at(rule.index, None)
    return rule


def get_preset(baseline: str, dataset: Optional[str] = None, backbone: str = DEFAULT_BACKBONE, *,
               pretrained: Optional[str] = EXPECTED_PRETRAINED, background=None,
               **overrides) -> Preset:
    """The preset of `baseline` on `dataset` (None: images outside the benchmarks) with CLIP
    `backbone`, optionally with protocol field overrides (``short_side``, ``crop``, ``stride``,
    ``logit_scale``, ``prob_thd``, ``area_thd``; None values are ignored) and another
    ``background`` rule (a `Background` or a spec such as ``"thd:0.3"``).

    ``expected_miou`` is the published number only for the published setting: the registered
    backbone and weights it was measured with and no override.
    """
    from .clip import get_baseline

    baseline = get_baseline(baseline).name
    spec = get_backbone(backbone)
    if baseline not in spec.baselines:
        raise ValueError(f"baseline {baseline!r} does not apply to backbone {spec.name} (it "
                         f"takes: {', '.join(spec.baselines)})")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(Protocol.__dataclass_fields__) - {"source"})
    if unknown:
        raise TypeError(f"get_preset got unknown protocol fields {unknown}; known: "
                        f"short_side, crop, stride, logit_scale, prob_thd, area_thd")
    if dataset is None:
        protocol = replace(base_protocol(baseline), **overrides) if overrides else base_protocol(baseline)
        name, classnames = f"{baseline}/{spec.name}", None
    else:
        dataset = _dataset_class(dataset).name
        protocol = get_protocol(baseline, dataset, **overrides)
        name, classnames = f"{baseline}/{dataset}/{spec.name}", dataset
    rule = _background_for(baseline, dataset, protocol.prob_thd)
    if background is not None:
        rule = _fit_background(_with_threshold(parse_background(background),
                                               overrides.get("prob_thd")), dataset)
    expected = measured = None
    if dataset is not None and not overrides and background is None and \
            pretrained == EXPECTED_PRETRAINED:
        expected = EXPECTED_MIOU.get((baseline, dataset, spec.name))
        measured = MEASURED_MIOU.get((baseline, dataset, spec.name))
    source = protocol.source
    if expected is not None:
        source += f"; mIoU from {_PAPERS[baseline]}"
    elif dataset is not None and baseline in NO_PUBLISHED_FIGURE:
        source += f"; {NO_PUBLISHED_FIGURE[baseline]}"
    return Preset(name, baseline, dataset, spec.name, protocol, rule, classnames, expected, source,
                  measured)


def default_preset(baseline: str, backbone: Optional[str] = None) -> Preset:
    """The preset for images outside the benchmarks; an unregistered backbone (None) gets the
    ViT-B/16 one, the protocols being the same for every backbone."""
    return get_preset(baseline, None, backbone or DEFAULT_BACKBONE)


def preset_names(backbone: str = DEFAULT_BACKBONE) -> list[str]:
    """Every named preset on `backbone`, benchmarks first."""
    from .backbones import ALL_BASELINES

    return ([f"{b}/{d}/{backbone}" for b in ALL_BASELINES for d in DATASET_NAMES]
            + [f"{b}/{backbone}" for b in ALL_BASELINES])


def preset_from_name(name: str, **kwargs) -> Preset:
    """``"sclip/voc21/ViT-B-16"``, ``"sclip/voc21"`` (ViT-B/16) or ``"sclip"`` -> its preset."""
    parts = [p for p in str(name).split("/") if p]
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"preset name must be 'baseline[/dataset][/backbone]', got {name!r}")
    baseline, rest = parts[0], parts[1:]
    dataset = backbone = None
    for part in rest:
        try:
            get_backbone(part)
            backbone = part
        except ValueError:
            dataset = part
    return get_preset(baseline, dataset, backbone or DEFAULT_BACKBONE, **kwargs)


def check_preset(preset: Preset, *, has_background: Optional[bool] = None) -> list[str]:
    """Reasons a run under `preset` will not mean what it seems (empty when none):
    a background rule on a dataset without a background class, a crop larger than the resized
    image. `has_background` overrides the dataset's own flag (custom data)."""
    reasons = []
    p = preset.protocol
    if has_background is None:
        has_background = _has_background(preset.dataset)
    if preset.background.enabled and has_background is False:
        from .data import load_class_names

        index = preset.background.index
        target = f"class {index}"
        if preset.classnames is not None:
            names = load_class_names(preset.classnames)
            if index < len(names):
                target += f" ({names[index][0]!r})"
        where = preset.dataset or "this dataset"
        reasons.append(f"background rule '{preset.background.describe()}' on {where}, which has no "
                       f"background class: the pixels it selects are labelled {target}, which "
                       f"lowers that class's IoU")
    if p.crop and p.short_side and p.crop > p.short_side:
        reasons.append(f"crop {p.crop} is larger than the resized image's short side "
                       f"{p.short_side}: windows shrink to the image along that side, so the "
                       f"crops are not {p.crop}x{p.crop}")
    return reasons


def warn_preset(preset: Preset, **kwargs) -> list[str]:
    """`check_preset`, each reason issued as a UserWarning; returns them."""
    reasons = check_preset(preset, **kwargs)
    for reason in reasons:
        warnings.warn(f"{preset.name}: {reason}", UserWarning, stacklevel=2)
    return reasons
