"""Backbone registry: open_clip configs, aliases, per-backbone defaults, positional
interpolation for every registered backbone, and ARM/CLIP mismatch errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import armfast.clip as aclip
from armfast import ARM, ARMConfig
from armfast.backbones import (BACKBONES, canonical_name, find_backbone, get_backbone)
from armfast.inference import Segmentor
from helpers.clip_models import tiny_clip, tiny_tower, vit_b16

NAMES = ("ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336")


@pytest.mark.parametrize("name", NAMES)
def test_registry_matches_open_clip_configs(name):
    import open_clip

    spec = get_backbone(name)
    cfg = open_clip.get_model_config(name)
    v = cfg["vision_cfg"]
    assert (spec.patch_size, spec.image_size, spec.width, spec.layers, spec.embed_dim) == (
        v["patch_size"], v["image_size"], v["width"], v["layers"], cfg["embed_dim"])
    assert spec.native_grid * spec.patch_size == spec.image_size
    # OpenAI weights build from the QuickGELU config, which open_clip has for every backbone
    assert spec.model_name_for("openai") == f"{name}-quickgelu"
    assert spec.model_name_for("openai") in open_clip.list_models()
    for tag in spec.pretrained:
        assert tag in open_clip.list_pretrained_tags_by_model(name), (name, tag)
    depth = spec.layers
    assert spec.shallow_layers == (depth // 3, depth // 2, 2 * depth // 3)
    assert max(spec.shallow_layers) < depth - 1


def test_aliases_and_unknown_names():
    assert get_backbone("ViT-B/16").name == "ViT-B-16"
    assert get_backbone("ViT-L/14@336px").name == "ViT-L-14-336"
    assert get_backbone("ViT-B-32-quickgelu").name == "ViT-B-32"
    assert canonical_name("ViT-L/14") == "ViT-L-14"
    assert canonical_name("local-dir:/x") is None and canonical_name(None) is None
    with pytest.raises(ValueError, match="unknown backbone 'ViT-X'"):
        get_backbone("ViT-X")
    with pytest.raises(TypeError, match="backbone name must be a string"):
        get_backbone(16)
    assert get_backbone("ViT-L-14").shallow_layers == (8, 12, 16)
    assert get_backbone("ViT-B-16").shallow_layers == (4, 6, 8)


def test_find_backbone_by_architecture():
    for spec in BACKBONES.values():
        assert find_backbone(patch_size=spec.patch_size, image_size=spec.image_size,
                             width=spec.width, layers=spec.layers, embed_dim=spec.embed_dim) is spec
    assert find_backbone(patch_size=8, image_size=32, width=64, layers=3, embed_dim=32) is None


def test_load_clip_alias_builds_quickgelu(monkeypatch):
    import open_clip

    seen = {}

    def fake_create_model(name, pretrained=None, **kwargs):
        seen.update(name=name, pretrained=pretrained, **kwargs)
        return torch.nn.Linear(1, 1)  # stands in for the model: no download

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    # the tag's file is found (cache or download) before open_clip builds: no network here
    monkeypatch.setattr("armfast.clip.weights.pretrained_file",
                        lambda name, tag, cache_dir=None: f"/cache/{name}-{tag}.safetensors")
    model = aclip.load_clip("ViT-L/14@336px", "openai")
    assert seen["name"] == "ViT-L-14-336" and seen["force_quick_gelu"] is True
    assert seen["pretrained"] == "/cache/ViT-L-14-336-openai.safetensors"
    assert seen["force_preprocess_cfg"]["mean"] == aclip.OPENAI_MEAN  # the tag's preprocessing
    assert model.armfast_name == "ViT-L-14-336"
    aclip.load_clip("ViT-B/32", "laion2b_s34b_b79k")
    assert seen["name"] == "ViT-B-32" and seen["force_quick_gelu"] is False


def test_backbone_of_and_default_layers():
    assert aclip.backbone_of(vit_b16()).name == "ViT-B-16"
    assert aclip.backbone_of(vit_b16().visual).name == "ViT-B-16"  # by architecture
    assert aclip.default_shallow_layers(vit_b16()) == (4, 6, 8)
    tower = tiny_tower(32)
    assert aclip.backbone_of(tower) is None
    assert aclip.default_shallow_layers(tower) == (1,)  # 3 blocks: only block 1 is shallow
    assert aclip.default_shallow_layers(tiny_tower(32, layers=6)) == (2, 3, 4)
    with torch.inference_mode():
        shallow, _ = aclip.extract(tower, torch.randn(1, 3, 32, 32))
    assert len(shallow) == 1


@pytest.mark.parametrize("name", NAMES)
def test_pos_embed_interpolates_non_square_for_every_backbone(name):
    """Each backbone's native grid to non-square crop grids: the exact size, the class position
    kept, constants preserved, and timm's resampling reproduced."""
    spec = get_backbone(name)
    g = spec.native_grid
    pos = torch.randn(1 + g * g, 16, generator=torch.Generator().manual_seed(0))
    for crop_h, crop_w in ((224, 336), (448, 224), (spec.image_size, spec.image_size + 2 * spec.patch_size)):
        grid = (crop_h // spec.patch_size, crop_w // spec.patch_size)
        out = aclip.interpolate_pos_embed(pos, (g, g), grid)
        assert out.shape == (1 + grid[0] * grid[1], 16)
        assert torch.equal(out[0], pos[0])
        patch = pos[1:].reshape(1, g, g, 16).permute(0, 3, 1, 2)
        ref = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
        torch.testing.assert_close(out[1:], ref.permute(0, 2, 3, 1).reshape(-1, 16))
    timm_layers = pytest.importorskip("timm.layers")
    ref = timm_layers.resample_abs_pos_embed(pos[None], [g + 3, g - 2], [g, g], num_prefix_tokens=1,
                                             interpolation="bicubic", antialias=False)[0]
    torch.testing.assert_close(aclip.interpolate_pos_embed(pos, (g, g), (g + 3, g - 2)), ref)


@pytest.mark.parametrize("name", NAMES)
def test_extract_non_square_crops_with_backbone_geometry(name):
    """A small tower with the backbone's patch size and native resolution runs non-square
    crops end to end (the grid follows the crop, the positional embedding is resized)."""
    spec = get_backbone(name)
    tower = tiny_tower(spec.image_size, patch_size=spec.patch_size, layers=2)
    assert aclip.native_grid(tower) == (spec.native_grid, spec.native_grid)
    H, W = 4 * spec.patch_size, 7 * spec.patch_size
    with torch.inference_mode():
        shallow, deep = aclip.extract(tower, torch.randn(1, 3, H, W), baseline="sclip",
                                      shallow_layers=(0,))
    assert deep.shape == (1, 28, 32) and shallow[0].shape == (1, 28, 64)


def test_arm_for_another_backbone_is_refused():
    text = F.normalize(torch.randn(3, 512), dim=-1)
    large = ARM(ARMConfig(backbone="ViT-L-14", width=1024, embed_dim=768, shallow_layers=(8, 12, 16)))
    with pytest.raises(ValueError, match=r"trained for backbone ViT-L-14 .* plugged into ViT-B-16"):
        Segmentor(vit_b16(), text, arm=large, short_side=0, crop=0)
    # same dims, another registered name: still another backbone (ViT-B-32 vs ViT-B-16)
    b32 = ARM(ARMConfig(backbone="ViT-B-32"))
    with pytest.raises(ValueError, match=r"backbone ViT-B-32 != ViT-B-16"):
        Segmentor(vit_b16(), text, arm=b32, short_side=0, crop=0)
    # OpenAI's name of the same backbone is fine
    Segmentor(vit_b16(), text, arm=ARM(ARMConfig(backbone="ViT-B/16")), short_side=0, crop=0)


def test_arm_dims_and_layers_checked_on_unregistered_clip():
    tiny_text = F.normalize(torch.randn(2, 32), dim=-1)
    wrong_width = ARM(ARMConfig(width=768, embed_dim=32, num_heads=2, head_dim=16, shallow_layers=(0,)))
    with pytest.raises(ValueError, match=r"ViT-B-16 .* 'armfast-tiny-test' .*width 768 != 64"):
        Segmentor(tiny_clip(), tiny_text, arm=wrong_width, short_side=0, crop=0)
    deep_layers = ARM(ARMConfig(width=64, embed_dim=32, num_heads=2, head_dim=16, shallow_layers=(0, 2),
                                backbone="armfast-tiny-test"))
    with pytest.raises(ValueError, match=r"shallow layers \(0, 2\) are not blocks 0\.\.1"):
        Segmentor(tiny_clip(), tiny_text, arm=deep_layers, short_side=0, crop=0)
    ok = ARM(ARMConfig(width=64, embed_dim=32, num_heads=2, head_dim=16, shallow_layers=(0, 1),
                       backbone="armfast-tiny-test"))
    assert Segmentor(tiny_clip(), tiny_text, arm=ok, short_side=0, crop=0).shallow_layers == (0, 1)


def test_trainer_arm_config_follows_the_registry():
    from armfast.train.config import TrainConfig
    from armfast.train.trainer import arm_config_for

    c = arm_config_for(vit_b16(), TrainConfig(data_root="", out="", model="ViT-B/16"))
    assert (c.backbone, c.width, c.embed_dim, c.shallow_layers) == ("ViT-B-16", 768, 512, (4, 6, 8))


def test_baseline_that_does_not_apply_is_refused(monkeypatch):
    import armfast.backbones as backbones

    only_sclip = dataclasses.replace(BACKBONES["ViT-B-16"], baselines=("sclip",))
    monkeypatch.setitem(backbones.BACKBONES, "ViT-B-16", only_sclip)
    with pytest.raises(ValueError, match="baseline 'naclip' does not apply to backbone ViT-B-16"):
        Segmentor(vit_b16(), F.normalize(torch.randn(2, 512), dim=-1), baseline="naclip")
