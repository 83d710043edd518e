"""Protocol presets: table, background rules, expected numbers, warnings, and `armfast eval`
printing them."""
from __future__ import annotations

import json
import warnings

import pytest

from armfast.background import SCLIP_BACKGROUND_WORDS, Background
from armfast.backbones import ALL_BASELINES, BACKBONES
from armfast.data import get_dataset_class
from armfast.presets import (EXPECTED_MIOU, check_preset, default_preset, get_preset,
                                  preset_from_name, preset_names)
from armfast.protocols import DATASET_NAMES, Protocol, base_protocol, get_protocol

# design contract, section 4 (ViT-B/16, OpenAI weights)
PUBLISHED = {
    "sclip": (59.1, 30.4, 30.5, 80.4, 34.2, 22.4, 32.2, 16.1),
    "clearclip": (51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7),
    "naclip": (58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4),
}


def test_every_baseline_dataset_backbone_has_a_preset():
    for backbone in BACKBONES:
        for name in preset_names(backbone):
            preset = preset_from_name(name)
            assert preset.name == name and preset.backbone == backbone
            assert isinstance(preset.protocol, Protocol) and preset.source
    assert len(preset_names()) == len(ALL_BASELINES) * (len(DATASET_NAMES) + 1)


def test_expected_numbers_are_the_published_ones():
    for baseline, values in PUBLISHED.items():
        for dataset, value in zip(DATASET_NAMES, values):
            preset = get_preset(baseline, dataset)
            assert preset.expected_miou == value, (baseline, dataset)
            assert "design contract" in preset.source
    assert len(EXPECTED_MIOU) == 40
    # no citable number: other baselines, backbones, weights, or any change to the protocol
    assert get_preset("proxyclip", "voc21").expected_miou is None
    assert get_preset("vanilla", "ade20k").expected_miou is None
    assert get_preset("sclip", "voc21", "ViT-L-14").expected_miou is None
    assert get_preset("sclip", "voc21", pretrained="laion2b_s34b_b88k").expected_miou is None
    assert get_preset("sclip", "voc21", crop=336).expected_miou is None
    assert get_preset("sclip", "voc21", background="thd:0.2").expected_miou is None
    assert get_preset("sclip", "voc21", crop=None).expected_miou == 59.1  # None = no override
    assert default_preset("sclip").expected_miou is None


# issue 25 (SC-CLIP as reported elsewhere; ResCLIP on NACLIP, its README's tables)
CALIBRATED = {
    "scclip": (64.6, 36.8, 37.7, 84.3, 40.1, 26.6, 41.0, 20.1),
    "resclip": (61.1, 33.5, 35.0, 86.0, 36.8, 24.7, 35.9, 18.0),
}


def test_calibrated_baselines_numbers_and_protocols():
    for baseline, values in CALIBRATED.items():
        for dataset, value in zip(DATASET_NAMES, values):
            preset = get_preset(baseline, dataset)
            assert preset.expected_miou == value and preset.measured_miou is None
            assert "paper mIoU" in preset.describe() and "measured not measured" in preset.describe()
    assert "RCS + SFR" in get_preset("resclip", "voc20").source
    for d in DATASET_NAMES:
        sfp = get_preset("sfp", d)
        assert sfp.expected_miou is None and "no published SFP figure" in sfp.source
    # RCS lambda per dataset (attn_rcs_weights [2.0, lambda] of ResCLIP's configs)
    lam = {"voc21": 0.3, "context60": 0.3, "coco_object": 0.4, "voc20": 0.6, "context59": 0.4,
           "coco_stuff164k": 0.4, "cityscapes": 0.2, "ade20k": 0.3}
    for d, value in lam.items():
        protocol = get_preset("resclip", d).protocol
        assert dict(protocol.baseline_options) == {"rcs_lambda": value}, d
    assert "rcs_lambda 0.6" in get_preset("resclip", "voc20").describe()
    assert get_preset("resclip", "voc21").protocol.crop == 0  # whole image, as its config
    assert get_preset("scclip", "coco_object").protocol.logit_scale == 55.0
    assert get_preset("scclip", "coco_stuff164k").protocol.short_side == 336
    assert get_preset("sfp", "ade20k").protocol.short_side == 384
    assert get_preset("scclip", "ade20k").protocol.short_side == 336
    assert get_preset("sfp", "voc21").background.words == SCLIP_BACKGROUND_WORDS
    assert get_preset("resclip", "voc21").background.prob_thd == 0.1


def test_protocol_is_the_published_one_on_every_backbone():
    for b in ("sclip", "clearclip", "naclip", "proxyclip"):
        for d in DATASET_NAMES:
            ref = get_protocol(b, d)
            for backbone in BACKBONES:
                assert get_preset(b, d, backbone).protocol == ref
        assert default_preset(b).protocol == base_protocol(b)
    assert get_preset("sclip", "voc21").protocol.area_thd == 0.1
    assert get_preset("clearclip", "cityscapes").protocol.crop == 224


def test_background_rules_per_dataset():
    voc = get_preset("sclip", "voc21").background
    assert voc == Background.from_words(SCLIP_BACKGROUND_WORDS, prob_thd=0.1)
    assert get_preset("naclip", "coco_object").background.words == SCLIP_BACKGROUND_WORDS
    assert get_preset("clearclip", "voc21").background == Background.from_words(["background"], prob_thd=0.5)
    assert get_preset("proxyclip", "coco_object").background.words[-1] == "rail"
    ctx = get_preset("clearclip", "context60").background
    assert ctx.words == ("background",) and ctx.prob_thd == 0.15
    for b in ("sclip", "clearclip", "naclip"):
        for d in DATASET_NAMES:
            preset = get_preset(b, d)
            has_bg = get_dataset_class(d).has_background
            assert preset.background.enabled == has_bg, (b, d)
            # the classes named plus the added background are exactly the dataset's classes
            n = len(preset.classes()) + (1 if preset.background.adds_class else 0)
            assert n == get_dataset_class(d).num_classes, (b, d)
            assert check_preset(preset) == [], (b, d)  # the published settings warn of nothing
    assert get_preset("sclip", "voc21").classes()[0][0] == "aeroplane"


def test_overrides_and_background_choices():
    p = get_preset("sclip", "voc21", prob_thd=0.3)
    assert p.background.prob_thd == 0.3 and p.background.words == SCLIP_BACKGROUND_WORDS
    p = get_preset("sclip", "voc21", background="thd:0.4")
    assert p.background == Background.threshold(0.4) and p.background.adds_class
    # a dataset without a background class keeps its classes: the rule targets class 0
    p = get_preset("naclip", "ade20k", background="thd:0.4")
    assert p.background.name is None and not p.background.adds_class
    p = get_preset("naclip", "ade20k", prob_thd=0.2)
    assert p.background == Background.threshold(0.2, name=None)
    # images outside the benchmarks: a "background" class is added
    assert default_preset("sclip").background == Background()
    assert get_preset("sclip", prob_thd=0.2).background == Background.threshold(0.2)
    assert get_preset("sclip", background="words:sky", prob_thd=0.2).background == \
        Background.from_words(["sky"], prob_thd=0.2)
    with pytest.raises(ValueError, match="give the threshold once"):
        get_preset("sclip", background="thd:0.1", prob_thd=0.2)
    with pytest.raises(TypeError, match="unknown protocol fields"):
        get_preset("sclip", "voc21", crops=3)
    with pytest.raises(ValueError, match="unknown backbone"):
        get_preset("sclip", "voc21", "ViT-Q")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_preset("sclip", "nope")
    assert Protocol(0, 0, 1, 40.0).crop == 0  # 0 = off is a valid protocol
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        Protocol(336, 224, 0, 40.0)


def test_preset_names():
    assert preset_from_name("sclip/voc21").name == "sclip/voc21/ViT-B-16"
    assert preset_from_name("naclip/ViT-L-14").name == "naclip/ViT-L-14"
    assert preset_from_name("clearclip").dataset is None
    with pytest.raises(ValueError, match="preset name must be"):
        preset_from_name("a/b/c/d")


def test_warnings_say_why():
    reasons = check_preset(get_preset("sclip", "cityscapes", prob_thd=0.3))
    assert len(reasons) == 1 and "no background class" in reasons[0] and "'road'" in reasons[0]
    reasons = check_preset(get_preset("clearclip", "ade20k", short_side=336))
    assert reasons == ["crop 448 is larger than the resized image's short side 336: windows shrink "
                       "to the image along that side, so the crops are not 448x448"]
    assert check_preset(get_preset("sclip", short_side=0, crop=448)) == []  # no resize: unknown
    assert check_preset(default_preset("sclip"), has_background=False) == []


# ------------------------------------------------------------------ armfast eval


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from helpers.synthetic_datasets import write_dataset, write_tiny_clip_dir

    root = tmp_path_factory.mktemp("presets")
    write_dataset("voc21", root / "data", n=1, size=(40, 48), splits=("val",))
    write_dataset("cityscapes", root / "data", n=1, size=(40, 48), splits=("val",))
    return root, write_tiny_clip_dir(root / "clip")


def test_eval_prints_the_preset_and_the_paper_number(voc, monkeypatch, capsys):
    """With --pretrained openai and no override the paper's number is printed beside the
    measured one (the tiny model stands in for the OpenAI weights: no download)."""
    import armfast.clip as aclip
    from armfast.cli import main

    root, model = voc
    real = aclip.load_clip
    monkeypatch.setattr(aclip, "load_clip", lambda name, pretrained=None, **kw: real(model, **kw))
    monkeypatch.setattr("armfast.clip.weights.pretrained_file", lambda name, tag: "unused")
    out = root / "r.json"
    rc = main(["eval", "--dataset", "voc21", "--root", str(root / "data"), "--baseline", "sclip",
               "--pretrained", "openai", "--workers", "0", "--no-progress", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "preset sclip/voc21/ViT-B-16: short 336, crop 224, stride 112, logit_scale 65" in text
    assert "background words [sky, wall, tree" in text and "prob_thd 0.1 -> added class" in text
    assert "paper mIoU 59.1" in text and "paper 59.1" in text
    assert any(line.startswith("sclip (paper)") and "59.1" in line for line in text.splitlines())
    result = json.loads(out.read_text())["results"][0]
    assert result["expected_miou"] == 59.1 and result["preset"]["name"] == "sclip/voc21/ViT-B-16"
    assert len(result["per_class"]) == 21 and result["class_names"][0] == "background"


def test_eval_warns_with_the_reason(voc, capsys):
    from armfast.cli import main

    root, model = voc
    rc = main(["eval", "--dataset", "cityscapes", "--root", str(root / "data"), "--model", model,
               "--short-side", "32", "--crop", "40", "--stride", "16", "--prob-thd", "0.3",
               "--workers", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0
    messages = [m for m in captured.err.splitlines() if m.startswith("armfast eval: warning: ")]
    assert any("cityscapes, which has no background class" in m for m in messages)
    assert any("crop 40 is larger than the resized image's short side 32" in m for m in messages)
    assert "paper mIoU n/a" in captured.out


def test_eval_background_override(voc, capsys):
    from armfast.cli import main

    root, model = voc
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid rule on a background dataset: no warning
        rc = main(["eval", "--dataset", "voc21", "--root", str(root / "data"), "--model", model,
                   "--background", "thd:0.2", "--short-side", "40", "--crop", "32", "--stride",
                   "16", "--workers", "0", "--no-progress"])
    assert rc == 0
    assert "background prob_thd 0.2 -> added class 'background' at 0" in capsys.readouterr().out
