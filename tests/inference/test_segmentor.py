"""Segmentor: sliding windows, post-processing, ARM plug-in, text inputs and errors."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import armfast
import armfast.clip as aclip
from armfast import ARM, ops
from armfast.background import Background
from armfast.inference import Segmentor, to_image_tensor
from armfast.inference.windows import slide_boxes
from helpers.clip_models import tiny_clip, vit_b16


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(4, 512, generator=g), dim=-1)


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(3, 48, 64, generator=g) * 255).to(torch.uint8)


def make(text, **kw):
    kw.setdefault("baseline", "naclip")
    kw.setdefault("short_side", 0)
    return Segmentor(vit_b16(), text, **kw)


def test_lazy_export():
    assert armfast.Segmentor is Segmentor


def test_slide_boxes_cover_the_image():
    for H, W, crop, stride in [(300, 500, (224, 224), (112, 112)), (100, 90, (224, 224), (112, 112)),
                               (336, 448, (336, 336), (112, 112)), (48, 80, (48, 48), (16, 16))]:
        boxes = slide_boxes(H, W, crop, stride)
        cover = np.zeros((H, W), dtype=int)
        for y1, y2, x1, x2 in boxes:
            assert 0 <= y1 < y2 <= H and 0 <= x1 < x2 <= W
            assert (y2 - y1, x2 - x1) == (min(crop[0], H), min(crop[1], W))
            cover[y1:y2, x1:x2] += 1
        assert cover.min() >= 1
    assert slide_boxes(48, 80, (48, 48), (16, 16)) == [(0, 48, 0, 48), (0, 48, 16, 64), (0, 48, 32, 80)]


def test_one_crop_covering_the_image_equals_whole_image(text, image):
    whole = make(text, crop=0)
    slide = make(text, crop=(48, 64), stride=16)
    a, b = whole.logits(image), slide.logits(image)
    torch.testing.assert_close(a, b)
    # and both are the crop's patch logits upsampled to the image, times logit_scale
    x = whole.preprocess(to_image_tensor(image))
    with torch.inference_mode():
        _, deep = aclip.extract(vit_b16(), x, baseline="naclip", shallow_layers=())
        ref = ops.patch_text_logits(deep, text).transpose(1, 2).reshape(1, 4, 3, 4)
        ref = F.interpolate(ref, size=(48, 64), mode="bilinear", align_corners=False)[0] * 40.0
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


def test_sliding_average_matches_per_crop_loop(text, image):
    seg = make(text, crop=32, stride=16, crop_batch_size=4)
    x = seg.preprocess(to_image_tensor(image))
    with torch.inference_mode():
        out = seg.slide_logits(x)
        total, count = torch.zeros(4, 48, 64), torch.zeros(48, 64)
        for y1, y2, x1, x2 in slide_boxes(48, 64, (32, 32), (16, 16)):
            crop_logits = seg.crop_logits(x[..., y1:y2, x1:x2])
            total[:, y1:y2, x1:x2] += F.interpolate(crop_logits, size=(32, 32), mode="bilinear",
                                                    align_corners=False)[0]
            count[y1:y2, x1:x2] += 1
    torch.testing.assert_close(out, total / count, rtol=1e-5, atol=1e-5)


def test_crop_padded_to_patch_multiple(text):
    seg = make(text, crop=0)
    img = torch.rand(3, 40, 50)
    probs = seg.probabilities(img)
    assert probs.shape == (4, 40, 50) and torch.isfinite(probs).all()


def test_untrained_arm_leaves_segmentation_unchanged(text, image):
    torch.manual_seed(0)
    arm = ARM()
    plain = make(text, crop=32, stride=16, logit_scale=40.0)
    refined = make(text, crop=32, stride=16, arm=arm)
    assert refined.shallow_layers == (4, 6, 8)
    assert refined.effective_logit_scale == pytest.approx(40.0)
    torch.testing.assert_close(refined.probabilities(image), plain.probabilities(image),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(refined.predict(image), plain.predict(image))


def test_arm_from_directory_and_trainable_crop_logits(text, tmp_path):
    ARM().save_pretrained(tmp_path / "arm")
    seg = make(text, arm=str(tmp_path / "arm"), crop=32, stride=16)
    crops = torch.randn(2, 3, 32, 32)
    logits = seg.crop_logits(crops, scaled=True)  # what a training step would use
    assert logits.shape == (2, 4, 2, 2)
    logits.sum().backward()
    assert seg.arm.logit_scale.grad is not None and seg.arm.cross_attn.out.weight.grad is not None
    assert not any(p.grad is not None for p in vit_b16().parameters())
    with pytest.raises(FileNotFoundError, match="no ARM folder"):
        make(text, arm=str(tmp_path / "missing"))


def test_synonyms_take_the_max(text, image):
    seg = make(text, class_index=torch.tensor([0, 1, 1, 2]), crop=0)
    assert seg.num_classes == 3
    syn = seg.logits(image).softmax(0)
    probs = seg.probabilities(image)
    torch.testing.assert_close(probs[0], syn[0])
    torch.testing.assert_close(probs[1], torch.maximum(syn[1], syn[2]))
    torch.testing.assert_close(probs[2], syn[3])
    assert seg.predict(image).shape == (48, 64)


def test_threshold_onto_an_existing_class(text, image):
    assert torch.all(make(text, crop=0, background=Background.threshold(1.0, name=None))
                     .predict(image) == 0)
    on_two = make(text, crop=0, background=Background.threshold(1.0, index=2, name=None))
    assert torch.all(on_two.predict(image) == 2) and on_two.num_classes == 4
    seg = make(text, crop=0)
    probs = seg.probabilities(image)
    assert torch.equal(seg.predict(image), probs.argmax(0))


def test_area_thd_drops_small_classes(text):
    seg = make(text, crop=0, area_thd=0.2)
    probs = torch.zeros(4, 10, 10)
    probs[1] = 0.6  # class 1 wins most pixels...
    probs[2, :1] = 0.9  # ...class 2 a tenth of them: under 20% of the foreground, dropped
    probs[3] = 0.3
    pred = seg.postprocess(probs)
    assert set(pred.unique().tolist()) == {1}
    seg.area_thd = None
    assert set(seg.postprocess(probs).unique().tolist()) == {1, 2}


def test_protocol_object_and_overrides(text):
    protocol = SimpleNamespace(short_side=32, crop=32, stride=16, logit_scale=50.0, prob_thd=0.1,
                               area_thd=None)
    seg = Segmentor(vit_b16(), text, baseline="sclip", protocol=protocol, stride=8)
    assert (seg.short_side, seg.crop, seg.stride) == ((32, 32), (32, 32), (8, 8))
    assert seg.logit_scale == 50.0 and seg.prob_thd == 0.1
    assert seg.preprocess(torch.rand(3, 40, 60)).shape == (1, 3, 32, 48)  # short side 32


def test_class_names_with_tiny_clip():
    seg = Segmentor(tiny_clip(), ["cat", ["person", "people"]], templates="simple",
                    baseline="clearclip", short_side=0, crop=16, stride=8)
    assert seg.class_names == ["cat", "person"] and seg.class_index.tolist() == [0, 1, 1]
    pred = seg.predict(np.zeros((20, 30, 3), dtype=np.uint8))
    assert pred.shape == (20, 30) and pred.dtype == torch.int64


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(class_index=torch.tensor([0, 2, 2, 3])), ValueError, "cover every class"),
    (dict(background=Background.threshold(0.5, index=4, name=None)), ValueError,
     "background index must be a class index in"),
    (dict(crop=(32, 0)), ValueError, "crop"),
    (dict(logit_scale=-1.0), ValueError, "logit_scale"),
    (dict(crop_batch_size=0), ValueError, "crop_batch_size"),
    (dict(baseline="nope"), ValueError, "baseline must be one of"),
    (dict(arm=3), TypeError, "arm must be"),
])
def test_constructor_errors(text, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(text, **kwargs)


def test_text_errors(text):
    with pytest.raises(ValueError, match="embed dim 512"):
        make(torch.randn(3, 64))
    with pytest.raises(ValueError, match="empty"):
        make([])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        make(text, crop=0).predict(torch.rand(4, 8, 8))


@pytest.mark.gpu
def test_cuda_float32_matches_cpu_and_bf16_runs(text, image):
    import copy

    model = copy.deepcopy(vit_b16()).cuda()
    kw = dict(baseline="naclip", short_side=0, crop=32, stride=16)
    cpu = make(text, **kw)
    gpu = Segmentor(model, text, precision="fp32", **kw)
    # TF32/fused kernels on the GPU: cosine logits x 40 agree to a few hundredths
    torch.testing.assert_close(gpu.logits(image).cpu(), cpu.logits(image), rtol=0, atol=0.1)
    for baseline in ("vanilla", "maskclip", "sclip", "clearclip", "naclip"):
        bf16 = Segmentor(model, text, precision="bf16", **dict(kw, baseline=baseline), arm=ARM())
        probs = bf16.probabilities(image)
        assert probs.is_cuda and probs.shape == (4, 48, 64) and torch.isfinite(probs).all()
