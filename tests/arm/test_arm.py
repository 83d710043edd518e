"""ARM: identity at initialisation, backends agree, safetensors round trip, input checks."""
import json

import pytest
import torch

import armfast
from armfast import ARM, ARMConfig

SMALL = ARMConfig(width=48, embed_dim=32, num_heads=2, head_dim=16, shallow_layers=(1, 2))


def inputs(cfg, B=2, N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    shallow = [torch.randn(B, N, cfg.width, generator=g) for _ in cfg.shallow_layers]
    return shallow, torch.randn(B, N, cfg.embed_dim, generator=g)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_default_config_matches_design():
    model = ARM()
    c = model.config
    assert (c.shallow_layers, c.width, c.embed_dim, c.num_heads, c.head_dim) == ((4, 6, 8), 768, 512, 8, 64)
    n_params = sum(p.numel() for p in model.parameters())
    assert 3.5e6 < n_params < 5e6  # "about 4 M parameters"


def test_untrained_arm_returns_deep_exactly():
    model = ARM(SMALL)
    shallow, deep = inputs(SMALL)
    for backend in ("reference", "sdpa", "auto"):
        assert torch.equal(model(shallow, deep, backend=backend), deep)


def test_backends_agree_and_gradients_flow():
    model = randomize(ARM(SMALL))
    shallow, deep = inputs(SMALL, N=9)
    ref = model(shallow, deep, backend="reference")
    assert not torch.allclose(ref, deep)
    torch.testing.assert_close(model(shallow, deep, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)
    ref.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n != "logit_scale")


def test_logits_use_learnt_tau():
    model = ARM(SMALL)
    x = torch.randn(1, 4, 32)
    text = torch.randn(3, 32)
    logits = model.logits(x, text)
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t()
    torch.testing.assert_close(logits, 40.0 * cos, atol=1e-4, rtol=1e-5)
    logits.sum().backward()
    assert model.logit_scale.grad is not None


def test_save_load_round_trip(tmp_path):
    model = randomize(ARM(SMALL), seed=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["shallow_layers"] == [1, 2]
    loaded = ARM.from_pretrained(tmp_path)
    assert loaded.config == SMALL
    shallow, deep = inputs(SMALL)
    for backend in armfast.available_backends("cpu"):
        torch.testing.assert_close(loaded(shallow, deep, backend=backend), model(shallow, deep, backend="reference"),
                                   atol=1e-5, rtol=1e-5)


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(Exception):
        ARM.from_pretrained(tmp_path / "nothing-here")


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=0), "num_heads must be a positive integer"),
    (dict(shallow_layers=()), "shallow_layers must name at least one layer"),
    (dict(mlp_ratio=0), "mlp_ratio must be finite and > 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ARMConfig(**kwargs)


def test_bad_forward_inputs():
    model = ARM(SMALL)
    shallow, deep = inputs(SMALL)
    with pytest.raises(ValueError, match=r"deep must be \[B, N, 32\]"):
        model(shallow, deep[..., :5])
    with pytest.raises(ValueError, match="shallow must be a list of 2 tensors"):
        model(shallow[:1], deep)
    with pytest.raises(ValueError, match=r"shallow\[1\] must be \[B, N, W\]"):
        model([shallow[0], shallow[1][:, :3]], deep)
    with pytest.raises(TypeError, match="config must be an ARMConfig"):
        ARM(config=5)


def test_bad_forward_container_dtype_and_device():
    model = ARM(SMALL)
    shallow, deep = inputs(SMALL)
    with pytest.raises(TypeError, match="shallow must be a list of 2 tensors"):
        model(None, deep)
    with pytest.raises(TypeError, match="deep must have the module's dtype"):
        model([h.double() for h in shallow], deep.double())


@pytest.mark.parametrize("kwargs,error", [
    (dict(mlp_ratio="4"), TypeError), (dict(logit_scale_init=float("nan")), ValueError),
    (dict(ln_eps=float("inf")), ValueError),
])
def test_bad_config_numbers(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        ARMConfig(**kwargs)
