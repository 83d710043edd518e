"""CLIP hooks: loading, positional interpolation, extraction against open_clip, text embeddings."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import armfast.clip as aclip
from armfast.clip import blocks
from helpers.clip_models import register_tiny, tiny_clip, tiny_tower, vit_b16

# ----------------------------------------------------------------------------- load_clip


def test_load_clip_random_is_frozen_eval():
    model = vit_b16()
    assert hasattr(model, "visual") and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.armfast_name == "ViT-B-16"


def test_load_clip_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        aclip.load_clip("ViT-B-16", str(missing))


def test_load_clip_unknown_model():
    with pytest.raises(ValueError, match="open_clip model"):
        aclip.load_clip("ViT-Nope-16")


def test_load_clip_openai_tag_builds_quickgelu(monkeypatch):
    import open_clip

    seen = {}

    def fake_create_model(name, pretrained=None, **kwargs):
        seen.update(name=name, pretrained=pretrained, **kwargs)
        return torch.nn.Linear(1, 1)  # stands in for the model: no download here

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    monkeypatch.setattr("armfast.clip.weights.pretrained_file",  # the tag's file, no download
                        lambda name, tag, cache_dir=None: f"/cache/{name}-{tag}.bin")
    aclip.load_clip("ViT-B-16", "openai")
    assert seen["pretrained"] == "/cache/ViT-B-16-openai.bin" and seen["force_quick_gelu"] is True
    aclip.load_clip("ViT-B-16", "laion2b_s34b_b88k")
    assert seen["force_quick_gelu"] is False


def test_load_clip_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    name = register_tiny()
    torch.manual_seed(5)
    source = aclip.load_clip(name)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = aclip.load_clip(name, str(path))
    for (k, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- positions


def test_interpolate_native_grid_is_identity():
    pos = vit_b16().visual.positional_embedding
    assert aclip.interpolate_pos_embed(pos, (14, 14), (14, 14)) is pos


@pytest.mark.parametrize("size", [336, 448])
def test_interpolate_matches_open_clip_resize(size):
    """open_clip's own checkpoint resizing (bicubic, align_corners=False, no antialias)."""
    from types import SimpleNamespace

    from open_clip.model import resize_pos_embed

    pos = vit_b16().visual.positional_embedding.detach()
    grid = size // 16
    state = {"visual.positional_embedding": pos.clone()}
    resize_pos_embed(state, SimpleNamespace(visual=SimpleNamespace(grid_size=(grid, grid))),
                     antialias=False)
    ours = aclip.interpolate_pos_embed(pos, (14, 14), (grid, grid))
    assert ours.shape == (1 + grid * grid, 768)
    torch.testing.assert_close(ours, state["visual.positional_embedding"], rtol=1e-6, atol=1e-6)


def test_interpolate_non_square_matches_timm():
    timm_layers = pytest.importorskip("timm.layers")
    pos = vit_b16().visual.positional_embedding.detach()
    ours = aclip.interpolate_pos_embed(pos, (14, 14), (21, 28))
    ref = timm_layers.resample_abs_pos_embed(pos[None], [21, 28], [14, 14], num_prefix_tokens=1,
                                             interpolation="bicubic", antialias=False)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[0], pos[0])  # class position untouched


def test_interpolate_keeps_constants():
    """Bicubic weights sum to one: a constant embedding stays constant at any grid."""
    pos = torch.full((1 + 14 * 14, 8), 0.25, dtype=torch.float64)
    out = aclip.interpolate_pos_embed(pos, (14, 14), (7, 33))
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


# ----------------------------------------------------------------------------- extract


def test_vanilla_matches_open_clip_vit_b16():
    model = vit_b16()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        shallow, deep = aclip.extract(model, images, baseline="vanilla")
        ref = model.visual.forward_intermediates(images, indices=[4, 6, 8, 11], output_fmt="NLC")
        inter = ref["image_intermediates"]
        for ours, theirs in zip(shallow, inter[:3]):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(deep, model.visual.ln_post(inter[3]) @ model.visual.proj,
                                   rtol=1e-4, atol=1e-4)
        # the class token through the same blocks is open_clip's image embedding
        x, grid = aclip.embed(model, images)
        assert grid == (14, 14)
        for block in model.visual.transformer.resblocks:
            x = blocks.block_forward(block, x)
        cls = model.visual.ln_post(x[:, 0]) @ model.visual.proj
        torch.testing.assert_close(cls, model.encode_image(images), rtol=1e-4, atol=1e-4)
    assert [s.shape for s in shallow] == [(1, 196, 768)] * 3 and deep.shape == (1, 196, 512)


def _resized_tower(source, image_size, grid):
    """An open_clip tower built for `image_size`, holding `source`'s weights with the
    positional embedding resized in the test (independent of armfast's helper)."""
    target = tiny_tower(image_size)
    state = copy.deepcopy(source.state_dict())
    pos = state["positional_embedding"]
    patch = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    state["positional_embedding"] = torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])])
    target.load_state_dict(state)
    return target


@pytest.mark.parametrize("hw", [(32, 32), (48, 64), (40, 24)])
def test_extract_any_grid_matches_open_clip_tower(hw):
    """At any crop size, extract equals open_clip's forward of a tower built for that size."""
    source = tiny_tower(32)
    grid = (hw[0] // 8, hw[1] // 8)
    target = _resized_tower(source, hw, grid)
    images = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shallow, deep = aclip.extract(source, images, shallow_layers=(0, 1))
        ref = target.forward_intermediates(images, indices=[0, 1, 2], output_fmt="NLC")
        inter = ref["image_intermediates"]
        for ours, theirs in zip(shallow, inter[:2]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deep, target.ln_post(inter[2]) @ target.proj, rtol=1e-5, atol=1e-5)


def test_extract_sequence_first_transformer():
    """A sequence-first open_clip Transformer (older releases) gives the same features, and
    they match open_clip's own sequence-first forward."""
    from open_clip.transformer import Transformer

    tower = tiny_tower(32)
    seq_first = copy.deepcopy(tower)
    seq_first.transformer = Transformer(64, 3, 2, batch_first=False)
    seq_first.transformer.load_state_dict(tower.transformer.state_dict())
    assert not any(b.attn.batch_first for b in seq_first.transformer.resblocks)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        shallow, deep = aclip.extract(seq_first, images, shallow_layers=(1,))
        ref = seq_first.forward_intermediates(images, indices=[1, 2], output_fmt="NLC")
        inter = ref["image_intermediates"]
        torch.testing.assert_close(shallow[0], inter[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deep, seq_first.ln_post(inter[1]) @ seq_first.proj,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deep, aclip.extract(tower, images, shallow_layers=())[1])


def test_extract_custom_blocks_fall_back_to_module_forward():
    """Non-standard blocks (qk-norm) run through their own forward for vanilla; the
    attention-rewriting baselines refuse them with a clear error."""
    tower = tiny_tower(32, qk_norm=True)
    assert not blocks.is_standard_block(tower.transformer.resblocks[0])
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        shallow, deep = aclip.extract(tower, images, shallow_layers=(0,))
        ref = tower.forward_intermediates(images, indices=[0, 2], output_fmt="NLC")["image_intermediates"]
    torch.testing.assert_close(shallow[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deep, tower.ln_post(ref[1]) @ tower.proj, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="ResidualAttentionBlock"):
        aclip.extract(tower, images, baseline="sclip", shallow_layers=())


def test_extract_attention_goes_through_ops(monkeypatch):
    import armfast.ops

    calls = []

    def counting(name):
        real = getattr(armfast.ops, name)

        def call(*args, **kw):
            calls.append(name)
            return real(*args, **kw)
        return call

    for name in ("attention", "self_correlation_sum"):
        monkeypatch.setattr(armfast.ops, name, counting(name))
    with torch.no_grad():
        aclip.extract(tiny_tower(32), torch.randn(1, 3, 32, 32), baseline="sclip", shallow_layers=())
    # two plain blocks, then sclip's last block: both softmaxes in one fused op
    assert calls == ["attention", "attention", "self_correlation_sum"]


@pytest.mark.parametrize("images, match", [
    (torch.randn(3, 32, 32), r"\[B, 3, H, W\]"),
    (torch.randn(1, 3, 30, 32), "multiples of the patch size"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "CLIP-normalised floats"),
])
def test_extract_rejects_bad_images(images, match):
    with pytest.raises((ValueError, TypeError), match=match):
        aclip.extract(tiny_tower(32), images, shallow_layers=())


def test_extract_argument_errors():
    tower, images = tiny_tower(32), torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="shallow_layers"):
        aclip.extract(tower, images, shallow_layers=(2,))  # the last block is the baseline's
    with pytest.raises(ValueError, match="baseline must be one of"):
        aclip.extract(tower, images, baseline="nope")
    with pytest.raises(ValueError, match="vfm="):
        aclip.extract(tower, images, baseline="proxyclip", shallow_layers=())
    with pytest.raises(TypeError, match="VisionTransformer"):
        aclip.extract(torch.nn.Linear(2, 2), images, shallow_layers=())


def test_feature_grid():
    assert aclip.feature_grid(vit_b16(), (224, 336)) == (14, 21)
    assert aclip.patch_size(vit_b16()) == (16, 16) and aclip.native_grid(vit_b16()) == (14, 14)


# ----------------------------------------------------------------------------- text


def test_templates():
    assert len(aclip.openai_templates()) == 80
    assert all(t.count("{}") == 1 for t in aclip.openai_templates())
    assert aclip.resolve_templates("simple") == ("a photo of a {}.",)
    assert aclip.resolve_templates([lambda c: f"a {c}!"]) == ("a {}!",)
    with pytest.raises(ValueError, match="exactly once"):
        aclip.resolve_templates(["no slot"])


def test_class_parsing(tmp_path):
    assert aclip.parse_class_list(" cat, person|people ,sky,") == [["cat"], ["person", "people"], ["sky"]]
    with pytest.raises(ValueError, match="empty"):
        aclip.parse_class_list(" , ")
    with pytest.raises(ValueError, match="empty"):
        aclip.normalize_classes([])
    with pytest.raises(TypeError, match="classes"):
        aclip.normalize_classes("cat")
    f = tmp_path / "names.txt"
    f.write_text("background, wall\ncat\n\nperson, people\n")
    assert aclip.read_class_file(f) == [["background", "wall"], ["cat"], ["person", "people"]]
    names, index = aclip.flatten_classes(aclip.read_class_file(f))
    assert names == ["background", "wall", "cat", "person", "people"]
    assert index.tolist() == [0, 0, 1, 2, 2]


def test_text_embeddings_and_cache(monkeypatch):
    import open_clip

    model = tiny_clip()
    templates = ("a photo of a {}.", "a sketch of the {}.")
    emb = aclip.encode_classes(model, ["cat", ["person", "people"]], templates)
    assert emb.embeddings.shape == (3, 32) and emb.class_index.tolist() == [0, 1, 1]
    assert emb.num_classes == 2 and emb.names == ("cat", "person", "people")
    torch.testing.assert_close(emb.embeddings.norm(dim=-1), torch.ones(3))
    # independent: normalise each template's embedding, average, normalise again
    tok = open_clip.get_tokenizer(register_tiny())
    with torch.no_grad():
        e = F.normalize(model.encode_text(tok([t.format("people") for t in templates])), dim=-1)
    torch.testing.assert_close(emb.embeddings[2], F.normalize(e.mean(0), dim=0), rtol=1e-5, atol=1e-6)
    # plain tensors even when encoded under inference_mode (they may meet autograd later)
    with torch.inference_mode():
        assert not aclip.encode_names(model, ["dog"], templates).is_inference()
    # cached per model and template set: no second text forward
    calls = []
    monkeypatch.setattr(model, "encode_text", lambda t: calls.append(t) or None)
    again = aclip.encode_classes(model, ["people", "cat"], templates)
    assert not calls
    torch.testing.assert_close(again.embeddings, emb.embeddings[[2, 0]])
