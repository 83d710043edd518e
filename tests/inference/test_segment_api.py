"""`armfast.segment`, SegmentationResult.save and the background rules, with a tiny random CLIP."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import armfast
from armfast import api
from armfast.background import SCLIP_BACKGROUND_WORDS, Background, parse_background
from armfast.presets import default_preset
from armfast.inference.result import SegmentationResult
from armfast.inference import Segmentor
from helpers.clip_models import tiny_clip

SMALL = dict(templates="simple", short_side=32, crop=32, stride=16)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def run(image, classes, **kw):
    kw = {**SMALL, **kw}
    return armfast.segment(image, classes, clip=tiny_clip(), **kw)


def test_lazy_exports_keep_import_light():
    code = ("import sys, armfast; assert 'open_clip' not in sys.modules; "
            "assert 'armfast.inference' not in sys.modules; "
            "assert armfast.segment.__module__ == 'armfast.api'; "
            "assert armfast.SegmentationResult.__module__ == 'armfast.inference.result'; "
            "assert armfast.Background.__module__ == 'armfast.background'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_result_fields(image):
    r = run(image, ["cat", ["person", "people"]])
    assert isinstance(r, SegmentationResult)
    assert r.labels.shape == (40, 56) and r.labels.dtype == torch.int64
    assert r.probs.shape == (2, 40, 56) and r.probs.dtype == torch.float32
    assert r.class_names == ["cat", "person"] and r.palette.shape == (2, 3)
    assert torch.equal(r.labels, r.probs.argmax(0))
    assert r.config["baseline"] == "sclip" and r.config["background"] == "none"
    assert abs(sum(r.areas().values()) - 1.0) < 1e-9
    assert torch.equal(r.mask("cat"), r.labels == 0)
    with pytest.raises(ValueError, match="name must be one of the classes"):
        r.mask("dog")


def test_same_as_the_benchmark_path(image):
    """No override: the default preset of the baseline, slide inference included."""
    r = armfast.segment(image, ["cat", "dog"], baseline="clearclip", clip=tiny_clip(),
                        templates="simple")
    p = default_preset("clearclip").protocol
    assert (r.config["short_side"], r.config["crop"], r.config["stride"]) == (p.short_side, p.crop, p.stride)
    assert r.config["logit_scale"] == p.logit_scale == 50.0
    seg = Segmentor(tiny_clip(), ["cat", "dog"], baseline="clearclip", protocol=p, templates="simple")
    torch.testing.assert_close(r.probs, seg.probabilities(image).cpu())
    assert torch.equal(r.labels, seg.predict(image).cpu())
    # a Segmentor without protocol uses the same preset
    plain = Segmentor(tiny_clip(), ["cat", "dog"], baseline="clearclip", templates="simple")
    assert (plain.short_side, plain.crop, plain.stride) == ((448, 448), (448, 448), (224, 224))


def test_one_config_for_segmentor_segment_and_keywords(image):
    config = armfast.SegmentorConfig(baseline="naclip", background="thd:0.7", **SMALL)
    assert config.background == Background.threshold(0.7)  # a spec is parsed once, here
    by_config = armfast.segment(image, ["cat", "dog"], config=config, clip=tiny_clip())
    by_keywords = run(image, ["cat", "dog"], baseline="naclip", background="thd:0.7")
    assert torch.equal(by_config.labels, by_keywords.labels) and by_config.config == by_keywords.config
    seg = Segmentor(tiny_clip(), ["cat", "dog"], config, short_side=0)  # keywords override it
    assert seg.settings == config.replace(short_side=0) and seg.short_side is None
    assert seg.class_names == ["background", "cat", "dog"] and seg.baseline == "naclip"
    with pytest.raises(TypeError, match=r"unknown SegmentorConfig field\(s\) amp; the fields are "
                                        r"baseline, protocol, short_side"):
        config.replace(amp=False)
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, fp32"):
        armfast.SegmentorConfig(precision="half")
    with pytest.raises(TypeError, match="config must be a SegmentorConfig"):
        Segmentor(tiny_clip(), ["cat"], {"baseline": "sclip"})


def test_save_by_extension(image, tmp_path):
    r = run(image, ["cat", "dog", "sky"])
    png = r.save(tmp_path / "out" / "x.png")
    im = Image.open(png)
    assert im.mode == "P" and im.size == (56, 40)
    np.testing.assert_array_equal(np.asarray(im), r.labels.numpy())
    np.testing.assert_array_equal(np.load(r.save(tmp_path / "x.npy")), r.labels.numpy())
    overlay = Image.open(r.save(tmp_path / "x.jpg"))
    assert overlay.mode == "RGB" and overlay.height >= 40 and overlay.width > 56  # legend beside
    assert Image.open(r.save(tmp_path / "x_overlay.png", kind="overlay")).mode == "RGB"
    with pytest.raises(ValueError, match="cannot tell what to write"):
        r.save(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="lossless"):
        r.save(tmp_path / "x.jpg", kind="labels")
    with pytest.raises(ValueError, match="not a .npy"):
        r.save(tmp_path / "x.npy", kind="overlay")
    with pytest.raises(ValueError, match="kind must be one of"):
        r.save(tmp_path / "x.png", kind="colours")


def test_threshold_background_adds_class_zero(image):
    plain = run(image, ["cat", "dog"])
    r = run(image, ["cat", "dog"], background="thd:0.7")
    assert r.class_names == ["background", "cat", "dog"]
    assert r.background == Background.threshold(0.7)
    assert torch.all(r.probs[0] == 0)  # a class with no text: only the threshold assigns it
    torch.testing.assert_close(r.probs[1:], plain.probs)
    best = plain.probs.max(0).values
    expected = torch.where(best < 0.7, 0, plain.labels + 1)
    assert torch.equal(r.labels, expected)
    assert torch.all(run(image, ["cat", "dog"], prob_thd=1.0).labels == 0)  # prob_thd= shorthand


def test_background_words(image):
    r = run(image, ["cat", "dog"], background="words:sky,wall")
    assert r.class_names == ["background", "cat", "dog"]
    seg = Segmentor(tiny_clip(), ["cat", "dog"], background="words:sky,wall", templates="simple",
                    short_side=32, crop=32, stride=16)
    assert seg.class_index.tolist() == [1, 2, 0, 0] and len(seg.text) == 4
    torch.testing.assert_close(r.probs, seg.probabilities(image).cpu())
    # the words join the softmax; the background class takes the best of them
    syn = seg.logits(image).softmax(0)
    torch.testing.assert_close(r.probs[0], torch.maximum(syn[2], syn[3]))
    torch.testing.assert_close(r.probs[1:], syn[:2])
    # a word that names a class stays that class's
    sky = Segmentor(tiny_clip(), ["Sky", "car"], background="words:sky,wall", templates="simple")
    assert sky.background_words == ("wall",) and sky.class_index.tolist() == [1, 2, 0]
    assert sky.config()["background_words_dropped"] == ["sky"]
    # with a threshold too, and SCLIP's set by default
    both = run(image, ["cat", "dog"], background="words:sky,wall+thd:0.99")
    assert both.background.prob_thd == 0.99 and torch.all(both.labels == 0)
    assert run(image, ["cat"], background="words", prob_thd=0.2).background == \
        Background.from_words(SCLIP_BACKGROUND_WORDS, prob_thd=0.2)


def test_background_on_an_existing_class_and_tensor_text():
    text = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    words = Background.from_words(["sky"], index=1, name=None)  # extra synonym of class 1
    seg = Segmentor(tiny_clip(), text, background=words, templates="simple", short_side=0, crop=0)
    assert seg.num_classes == 3 and seg.class_index.tolist() == [0, 1, 2, 1]
    thd = Background.threshold(0.5, index=3)  # appended after the three classes
    seg = Segmentor(tiny_clip(), text, background=thd, short_side=0, crop=0)
    assert seg.num_classes == 4 and seg.class_names[3] == "background"
    probs = seg.probabilities(torch.rand(3, 16, 16))
    assert probs.shape == (4, 16, 16) and torch.all(probs[3] == 0)
    with pytest.raises(ValueError, match="past the end of the 3 classes"):
        Segmentor(tiny_clip(), text, background=Background.threshold(0.5, index=4), short_side=0, crop=0)
    for legacy in (dict(prob_thd=0.3), dict(background_index=1)):  # one spelling: background=
        with pytest.raises(TypeError, match="unknown SegmentorConfig field"):
            Segmentor(tiny_clip(), text, short_side=0, crop=0, **legacy)


@pytest.mark.parametrize("spec, expected", [
    (None, Background()), ("none", Background()), (" off ", Background()),
    ("thd:0.3", Background("threshold", 0.3)), ("threshold:0.3", Background("threshold", 0.3)),
    (0.25, Background("threshold", 0.25)),
    ("words:sky, wall", Background("words", 0.0, ("sky", "wall"))),
    ("words", Background("words", 0.0, SCLIP_BACKGROUND_WORDS)),
    ("words:sky+thd:0.1", Background("words", 0.1, ("sky",))),
])
def test_parse_background(spec, expected):
    assert parse_background(spec) == expected


@pytest.mark.parametrize("spec, error, match", [
    ("thd:x", ValueError, "needs a number"), ("thd:0", ValueError, "prob_thd > 0"),
    ("thd:1.5", ValueError, r"prob_thd must be in \[0, 1\]"), ("words:", ValueError, "lists no words"),
    ("blur", ValueError, "background must be 'none'"), (["sky"], TypeError, "background must be"),
])
def test_parse_background_errors(spec, error, match):
    with pytest.raises(error, match=match):
        parse_background(spec)


def test_background_validation():
    with pytest.raises(ValueError, match="mode must be one of"):
        Background("nope")
    with pytest.raises(ValueError, match="'none' takes no prob_thd"):
        Background("none", 0.2)
    with pytest.raises(TypeError, match="not one string"):
        Background("words", words="sky,wall")
    with pytest.raises(ValueError, match="index must be a non-negative"):
        Background.threshold(0.1, index=-1)
    assert "added class 'background' at 0" in Background.from_words(["sky"], prob_thd=0.1).describe()


def test_clip_cache_loads_once(monkeypatch, image):
    import armfast.clip as aclip

    calls = []

    def fake_load_clip(name, pretrained=None, device="cpu", **kw):
        calls.append((name, pretrained, str(device)))
        return tiny_clip()

    monkeypatch.setattr(aclip, "load_clip", fake_load_clip)
    api.clear_clip_cache()
    try:
        a = armfast.segment(image, ["cat"], backbone="ViT-B-16", pretrained=None, device="cpu", **SMALL)
        b = armfast.segment(image, ["dog"], backbone="ViT-B-16", pretrained=None, device="cpu", **SMALL)
        assert calls == [("ViT-B-16", None, "cpu")]
        assert a.class_names == ["cat"] and b.class_names == ["dog"]
        api.get_clip("ViT-B-16", "openai", "cpu")
        assert len(calls) == 2  # another weights tag is another model
    finally:
        api.clear_clip_cache()


def test_segment_argument_errors(image, tmp_path):
    with pytest.raises(TypeError, match=r"unknown SegmentorConfig field\(s\) crops"):
        run(image, ["cat"], crops=3)
    with pytest.raises(ValueError, match="backbone 'ViT-L-14' does not match the given clip"):
        armfast.segment(image, ["cat"], clip=_b16(),
                        backbone="ViT-L-14")
    with pytest.raises(FileNotFoundError, match="no ARM folder"):
        run(image, ["cat"], arm=tmp_path / "missing")
    with pytest.raises(ValueError, match="give the threshold once"):
        run(image, ["cat"], background="thd:0.2", prob_thd=0.3)
    with pytest.warns(UserWarning, match="crop 64 is larger than the resized image's short side 32"):
        run(image, ["cat"], crop=64)


def _b16():
    from helpers.clip_models import vit_b16

    return vit_b16()


def test_cli_segment_background_and_config(tmp_path, capsys):
    from armfast.cli import main
    from helpers.synthetic_datasets import write_tiny_clip_dir

    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(path)
    model = write_tiny_clip_dir(tmp_path / "clip")
    rc = main(["segment", str(path), "--classes", "cat,dog", "--background", "words:sky,wall",
               "--prob-thd", "0.3", "--clip-model", model, "--templates", "simple",
               "--short-side", "32", "--crop", "32", "--stride", "16", "--device", "cpu",
               "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "sclip/ViT-B-16" in out and "words [sky, wall] + prob_thd 0.3" in out
    labels = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert labels.shape == (36, 44) and set(np.unique(labels).tolist()) <= {0, 1, 2}
    rc = main(["segment", str(path), "--classes", "cat", "--background", "thd:2", "--pretrained",
               "none", "-o", str(tmp_path / "out")])
    assert rc == 2 and "prob_thd must be in [0, 1]" in capsys.readouterr().err
