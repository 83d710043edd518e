"""An ARM folder on disk: our README, umask modes, quiet loading, and refusal of anything
damaged, with the file named."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from armfast import ARM, ARMConfig

SMALL = dict(shallow_layers=(0, 1), width=16, embed_dim=8, num_heads=2, head_dim=4)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    arm = ARM(ARMConfig(**SMALL))
    with torch.no_grad():
        for p in arm.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the zero-initialised identity
    arm.save_pretrained(tmp_path / "arm")
    return arm, tmp_path / "arm"


def test_round_trip_is_quiet_and_exact(saved, capsys):
    arm, folder = saved
    loaded = ARM.from_pretrained(str(folder))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # no "Loading weights from local directory"
    for k, v in arm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.config == arm.config and not loaded.training


def test_readme_is_ours(saved):
    _, folder = saved
    card = (folder / "README.md").read_text()
    assert "pushed to the Hub" not in card and "More Information Needed" not in card
    assert "ARM.from_pretrained" in card and str(folder) in card
    assert '"embed_dim": 8' in card  # the config
    # saving again over the folder refreshes it (the mixin keeps an existing README)
    arm2 = ARM(ARMConfig(**{**SMALL, "embed_dim": 12}))
    arm2.save_pretrained(folder)
    assert '"embed_dim": 12' in (folder / "README.md").read_text()


def test_file_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ARM(ARMConfig(**SMALL)).save_pretrained(tmp_path / "arm")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "arm").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644, "README.md": 0o644}, modes


def _refused(folder, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ARM.from_pretrained(str(folder))


def test_damaged_weights_are_refused(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _refused(folder, "model.safetensors is damaged or truncated")
    weights.write_bytes(b"\x00" * 64)
    _refused(folder, "model.safetensors is damaged or truncated")


def test_non_finite_weights_are_refused(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    state["mlp.fc1.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    _refused(folder, r"model.safetensors: tensor 'mlp.fc1.weight' holds 1 non-finite")


def test_wrong_shapes_and_missing_tensors_are_refused(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "deep_norm.weight": torch.ones(3)}, str(weights))
    _refused(folder, r"tensor 'deep_norm.weight' has shape \(3,\) but the config gives \(8,\)")
    del state["mlp.fc2.bias"]
    save_file(state, str(weights))
    _refused(folder, r"does not hold this ARM's weights: missing 1 tensor\(s\) \(mlp.fc2.bias\)")


def test_missing_or_bad_config_is_refused(saved):
    _, folder = saved
    config = folder / "config.json"
    text = config.read_text()
    config.write_text("{not json")
    _refused(folder, "config.json is not valid JSON")
    config.write_text(json.dumps({**json.loads(text), "num_heads": 0}))
    _refused(folder, "config.json is not a valid ARMConfig: ARMConfig.num_heads")
    config.unlink()
    _refused(folder, "config.json not found: .* is not an ARM folder")
