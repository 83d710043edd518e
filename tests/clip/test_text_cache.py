"""Text embeddings on disk: keyed by the text tower's weights, the templates and the device type."""
from __future__ import annotations

import copy

import torch

import armfast.clip as aclip
from armfast.clip.text import TEXT_CACHE_ENV, text_tower_hash
from helpers.clip_models import tiny_clip

TEMPLATES = ("a photo of a {}.", "art of the {}.")


def no_text_forward(monkeypatch, model):
    calls = []
    monkeypatch.setattr(model, "encode_text", lambda t: calls.append(t) or None)
    return calls


def test_second_process_reads_the_disk_cache(tmp_path, monkeypatch):
    first = copy.deepcopy(tiny_clip())  # a fresh object: nothing in the memory cache
    emb = aclip.encode_classes(first, ["cat", ["person", "people"]], TEMPLATES, cache_dir=tmp_path)
    files = list(tmp_path.glob("text-*.safetensors"))
    assert len(files) == 1
    # "another process": a new model object with the same weights, memory cache empty
    second = copy.deepcopy(tiny_clip())
    assert text_tower_hash(second) == text_tower_hash(first)
    calls = no_text_forward(monkeypatch, second)
    again = aclip.encode_classes(second, ["people", "cat"], TEMPLATES, cache_dir=tmp_path)
    assert not calls
    assert torch.equal(again.embeddings, emb.embeddings[[2, 0]])
    assert not again.embeddings.is_inference()
    # a new name is encoded alone and merged into the same file
    third = copy.deepcopy(tiny_clip())
    calls = []
    real = third.encode_text
    monkeypatch.setattr(third, "encode_text", lambda t: calls.append(len(t)) or real(t))
    aclip.encode_names(third, ["cat", "dog"], TEMPLATES, cache_dir=tmp_path)
    assert calls == [len(TEMPLATES)]  # "dog" only
    assert len(list(tmp_path.glob("text-*.safetensors"))) == 1


def test_key_follows_weights_templates_and_environment(tmp_path, monkeypatch):
    model = copy.deepcopy(tiny_clip())
    aclip.encode_names(model, ["cat"], TEMPLATES, cache_dir=tmp_path)
    aclip.encode_names(model, ["cat"], TEMPLATES[:1], cache_dir=tmp_path)  # other templates
    changed = copy.deepcopy(tiny_clip())
    with torch.no_grad():
        changed.ln_final.weight.add_(0.5)  # other text weights: another key, not a stale hit
    assert text_tower_hash(changed) != text_tower_hash(model)
    a = aclip.encode_names(changed, ["cat"], TEMPLATES, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("text-*.safetensors"))) == 3
    assert not torch.equal(a, aclip.encode_names(model, ["cat"], TEMPLATES))
    # the environment variable is the default directory
    monkeypatch.setenv(TEXT_CACHE_ENV, str(tmp_path / "env"))
    aclip.encode_names(copy.deepcopy(tiny_clip()), ["cat"], TEMPLATES)
    assert len(list((tmp_path / "env").glob("text-*.safetensors"))) == 1


def test_damaged_cache_file_is_a_miss(tmp_path):
    model = copy.deepcopy(tiny_clip())
    emb = aclip.encode_names(model, ["cat"], TEMPLATES, cache_dir=tmp_path)
    (path,) = tmp_path.glob("text-*.safetensors")
    path.write_bytes(b"not a safetensors file")
    again = aclip.encode_names(copy.deepcopy(tiny_clip()), ["cat"], TEMPLATES, cache_dir=tmp_path)
    torch.testing.assert_close(again, emb)
    assert path.stat().st_size > 100  # rewritten
