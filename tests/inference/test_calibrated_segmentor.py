"""SC-CLIP, SFP and ResCLIP behind the Segmentor, the presets and training: ARM plugged behind
each (identity untrained, trainable), ResCLIP's per-dataset lambda reaching the last block."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import armfast.clip as aclip
from armfast import ARM
from armfast.inference import CropModel, Segmentor
from armfast.presets import get_preset
from armfast.train.config import TrainConfig
from helpers.clip_models import vit_b16

NAMES = ("scclip", "sfp", "resclip")


@pytest.fixture(scope="module")
def text():
    return F.normalize(torch.randn(4, 512, generator=torch.Generator().manual_seed(0)), dim=-1)


@pytest.fixture(scope="module")
def image():
    return (torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)


@pytest.mark.parametrize("name", NAMES)
def test_untrained_arm_leaves_each_unchanged(name, text, image):
    torch.manual_seed(0)
    plain = Segmentor(vit_b16(), text, baseline=name, short_side=0, crop=0, logit_scale=40.0)
    refined = Segmentor(vit_b16(), text, baseline=name, short_side=0, crop=0, arm=ARM())
    probs = plain.probabilities(image)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(refined.probabilities(image), probs, rtol=1e-5, atol=1e-6)


def test_resclip_lambda_of_the_preset_reaches_the_last_block(text):
    protocol = get_preset("resclip", "voc20").protocol
    seg = Segmentor(vit_b16(), text, baseline="resclip", protocol=protocol, short_side=0, crop=0)
    assert seg.crop_model.baseline_options == {"rcs_lambda": 0.6}
    assert seg.config()["baseline_options"] == {"rcs_lambda": 0.6}
    crops = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, deep, _ = seg.crop_model.features(crops)
        _, want = aclip.extract(vit_b16(), crops, baseline="resclip",
                                baseline_options={"rcs_lambda": 0.6})
        _, default = aclip.extract(vit_b16(), crops, baseline="resclip")
    torch.testing.assert_close(deep, want)
    assert not torch.allclose(deep, default)
    with pytest.raises(ValueError, match="has no option rcs_lambda"):
        aclip.extract(vit_b16(), crops, baseline="sclip", baseline_options={"rcs_lambda": 0.6})


@pytest.mark.parametrize("name", NAMES)
def test_arm_trains_behind_each(name):
    """The training set accepts them; a step on their frozen features reaches ARM only."""
    assert TrainConfig(data_root="x", out="y", baselines=f"naclip,{name}").baselines == ("naclip", name)
    from armfast.bench.workloads import randomize_residual_outputs

    torch.manual_seed(0)  # off the identity start, so every layer gets a gradient
    arm = randomize_residual_outputs(ARM(), torch.Generator().manual_seed(1))
    model = CropModel(vit_b16(), baseline=name, arm=arm)
    crops = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        shallow, deep, grid = model.features(crops)
    assert deep.shape == (2, grid[0] * grid[1], 512)
    logits = model.head(shallow, deep, F.normalize(torch.randn(3, 512), dim=-1))
    logits.logsumexp(-1).mean().backward()
    assert arm.cross_attn.q.weight.grad is not None and arm.logit_scale.grad is not None
    assert all(p.grad is None for p in vit_b16().parameters())


def test_crop_budget_counts_what_the_last_block_reads():
    """ResCLIP holds four [heads, T, T] maps, SC-CLIP seven block outputs: more per crop."""
    def per_crop(name):
        return CropModel(vit_b16(), baseline=name).crop_bytes((448, 448), 20, 4)

    T, W, H = 785, 768, 12
    assert per_crop("resclip") - per_crop("naclip") == 4 * H * T * T * 4 + 4 * T * T * 4
    assert per_crop("scclip") - per_crop("naclip") == 7 * T * W * 4 + 4 * T * T * 4
    assert per_crop("sfp") > per_crop("scclip")
