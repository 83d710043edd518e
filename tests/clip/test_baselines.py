"""Each baseline's last block against an independent float64 implementation of its formula,
and the ProxyCLIP VFM plumbing."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import armfast.clip as aclip
from armfast import ops as aclip_ops
from armfast.clip import baselines
from helpers.clip_models import FakeDino, tiny_tower, vit_b16

GRID = (3, 4)
N = GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def block64():
    """ViT-B-16's last block in float64, with random LayerNorm affines (init leaves them 1/0)."""
    block = copy.deepcopy(vit_b16().visual.transformer.resblocks[-1]).double()
    g = torch.Generator().manual_seed(0)
    for ln in (block.ln_1, block.ln_2):
        ln.weight.data = 1 + 0.1 * torch.randn(768, generator=g, dtype=torch.float64)
        ln.bias.data = 0.1 * torch.randn(768, generator=g, dtype=torch.float64)
    block.attn.in_proj_bias.data = 0.1 * torch.randn(3 * 768, generator=g, dtype=torch.float64)
    assert isinstance(block.mlp.gelu, torch.nn.GELU)
    return block


@pytest.fixture(scope="module")
def x64():
    return torch.randn(2, 1 + N, 768, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# --- the independent formulas: plain tensor algebra on the block's parameters ----------------

def _heads(t):  # [B, T, 768] -> [B, 12, T, 64]
    return t.reshape(t.shape[0], t.shape[1], 12, 64).transpose(1, 2)


def _qkv(block, x):
    h = F.layer_norm(x, (768,), block.ln_1.weight, block.ln_1.bias, eps=block.ln_1.eps)
    W, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    return tuple(_heads(h @ W[i * 768:(i + 1) * 768].T + b[i * 768:(i + 1) * 768]) for i in range(3))


def _out(block, o):  # merge heads, out_proj
    o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], 768)
    return o @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def _ffn(block, y):
    h = F.layer_norm(y, (768,), block.ln_2.weight, block.ln_2.bias, eps=block.ln_2.eps)
    h = h @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return y + h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def _softmax_rows(s):
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


S = 64 ** -0.5


def expected(name, block, x):
    q, k, v = _qkv(block, x)
    if name == "vanilla":
        y = _ffn(block, x + _out(block, _softmax_rows(S * q @ k.transpose(-1, -2)) @ v))
    elif name == "maskclip":
        y = _ffn(block, x + _out(block, v))
    elif name == "sclip":
        a = _softmax_rows(S * q @ q.transpose(-1, -2)) + _softmax_rows(S * k @ k.transpose(-1, -2))
        torch.testing.assert_close(a.sum(-1), torch.full_like(a.sum(-1), 2.0))
        y = _ffn(block, x + _out(block, a @ v))
    elif name == "clearclip":
        y = _out(block, _softmax_rows(S * q @ q.transpose(-1, -2)) @ v)
    elif name == "naclip":
        G = torch.zeros(1 + N, 1 + N, dtype=torch.float64)
        for i in range(N):
            for j in range(N):
                (ri, ci), (rj, cj) = divmod(i, GRID[1]), divmod(j, GRID[1])
                G[1 + i, 1 + j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * 5.0 ** 2))
        y = _out(block, _softmax_rows(S * k @ k.transpose(-1, -2) + G) @ v)
    else:
        raise AssertionError(name)
    return y[:, 1:]


def _input(x):
    return baselines.LastBlockInput(x=x, grid=GRID, images=torch.zeros(x.shape[0], 3, 48, 64),
                                    image_mean=aclip.OPENAI_MEAN, image_std=aclip.OPENAI_STD,
                                    backend="reference")


@pytest.mark.parametrize("name", ["vanilla", "maskclip", "sclip", "clearclip", "naclip"])
def test_last_block_formula(name, block64, x64):
    with torch.no_grad():
        tokens, grid = baselines.run_baseline(name, block64, _input(x64))
        ref = expected(name, block64, x64)
    assert grid == GRID and tokens.shape == (2, N, 768)
    torch.testing.assert_close(tokens, ref, rtol=1e-10, atol=1e-10)


def test_registry():
    assert list(aclip.BASELINES) == ["vanilla", "maskclip", "sclip", "clearclip", "naclip", "proxyclip",
                                     "scclip", "sfp", "resclip"]
    from armfast.backbones import ALL_BASELINES

    assert ALL_BASELINES == tuple(aclip.BASELINES)  # every name the presets and training accept
    assert aclip.get_baseline("SCLIP").name == "sclip"
    with pytest.raises(TypeError, match="baseline must be a string"):
        aclip.get_baseline(3)


def test_gaussian_bias_zero_on_cls():
    g = baselines.gaussian_bias(2, 3, 5.0)
    assert g.shape == (7, 7) and torch.all(g[0] == 0) and torch.all(g[:, 0] == 0)
    torch.testing.assert_close(torch.diagonal(g)[1:], torch.ones(6))


@pytest.mark.parametrize("name", [n for n, b in aclip.BASELINES.items() if not b.needs_vfm])
def test_every_baseline_extracts_vit_b16(name):
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        shallow, deep = aclip.extract(vit_b16(), images, baseline=name)
    assert [s.shape for s in shallow] == [(2, 6, 768)] * 3 and deep.shape == (2, 6, 512)
    assert torch.isfinite(deep).all()


# --- ProxyCLIP --------------------------------------------------------------------------------

def test_vfm_adapter_preprocessing_and_grid():
    torch.manual_seed(0)
    dino = FakeDino(patch=4).double()
    vfm = aclip.VisionFoundationModel(dino)
    pixels = torch.rand(2, 3, 16, 20, dtype=torch.float64)
    mean, std = torch.tensor(aclip.OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(aclip.OPENAI_STD).view(1, 3, 1, 1)
    feats = vfm(((pixels - mean) / std).double(), clip_mean=aclip.OPENAI_MEAN, clip_std=aclip.OPENAI_STD)
    assert feats.shape == (2, 16, 4, 5) and vfm.grid(16, 20) == (4, 5)
    imnet = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(dino.seen, imnet.double())
    with torch.no_grad():
        ref = dino.proj(imnet.double())
    torch.testing.assert_close(feats, ref)
    with pytest.raises(ValueError, match="patch_size"):
        aclip.VisionFoundationModel(lambda x: x)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        aclip.as_vfm("/nonexistent/nope.pth")


def test_proxyclip_formula():
    """softmax of 3 (S - 1.2 mean S) with negatives masked, on CLIP's V resampled to the VFM grid."""
    torch.manual_seed(0)
    tower = tiny_tower(32).double()
    dino = FakeDino(patch=4).double()
    images = torch.randn(2, 3, 32, 24, dtype=torch.float64)  # CLIP grid 4x3, VFM grid 8x6
    with torch.no_grad():
        shallow, deep = aclip.extract(tower, images, baseline="proxyclip", shallow_layers=(0,),
                                      vfm=dino, backend="reference")
        assert deep.shape == (2, 48, 32) and shallow[0].shape == (2, 48, 64)
        assert aclip.feature_grid(tower, (32, 24), "proxyclip", dino) == (8, 6)

        # independent: the last block's input from open_clip's own blocks
        x, grid = aclip.embed(tower, images)
        for block in tower.transformer.resblocks[:-1]:
            x = block(x)
        block = tower.transformer.resblocks[-1]
        feats = aclip.as_vfm(dino)(images, clip_mean=aclip.OPENAI_MEAN, clip_std=aclip.OPENAI_STD)
        f = feats.flatten(2)
        f = f / f.norm(dim=1, keepdim=True)
        Sim = f.transpose(1, 2) @ f
        A = 3.0 * (Sim - 1.2 * Sim.mean(dim=(1, 2), keepdim=True))
        A[A < 0] = float("-inf")
        P = _softmax_rows(A)
        h = block.ln_1(x)
        v = h @ block.attn.in_proj_weight[128:].T + block.attn.in_proj_bias[128:]  # [B, T, 64]
        v = v[:, 1:].reshape(2, 4, 3, 2, 32).permute(0, 3, 4, 1, 2).reshape(4, 32, 4, 3)
        v = F.interpolate(v, size=(8, 6), mode="bilinear", align_corners=False)
        v = v.reshape(2, 2, 32, 48).transpose(-1, -2)  # [B, heads, 48, d]
        o = (P[:, None] @ v).transpose(1, 2).reshape(2, 48, 64)
        ref = tower.ln_post(block.attn.out_proj(o)) @ tower.proj
        torch.testing.assert_close(deep, ref, rtol=1e-10, atol=1e-10)
        # shallow tokens: block 0's patch tokens resampled bilinearly to the VFM grid
        x0 = tower.transformer.resblocks[0](aclip.embed(tower, images)[0])[:, 1:]
        x0 = F.interpolate(x0.transpose(1, 2).reshape(2, 64, 4, 3), size=(8, 6), mode="bilinear",
                           align_corners=False).flatten(2).transpose(1, 2)
        torch.testing.assert_close(shallow[0], x0, rtol=1e-10, atol=1e-10)


def test_vfm_from_timm_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              dynamic_img_size=True).eval()
    path = tmp_path / "vfm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = aclip.load_vfm(path, arch="vit_tiny_patch16_224")
    images = torch.randn(1, 3, 32, 48)
    a = aclip.as_vfm(model)(images, clip_mean=aclip.OPENAI_MEAN, clip_std=aclip.OPENAI_STD)
    b = loaded(images, clip_mean=aclip.OPENAI_MEAN, clip_std=aclip.OPENAI_STD)
    assert a.shape == (1, 192, 2, 3)
    torch.testing.assert_close(a, b)
    assert aclip.load_vfm(path, arch="vit_tiny_patch16_224") is loaded  # loaded once


# --- the fused backends in the last block ------------------------------------------------------

FUSED = [pytest.param(b, marks=pytest.mark.skipif(
    aclip_ops.backend_status("cpu")[b] is not None, reason=f"{b} backend unavailable"))
    for b in ("cpu",)]
FUSED_BASELINES = ("sclip", "clearclip", "naclip", "proxyclip")


def last_block_input(tower, images, backend, vfm=None):
    """The last block's input of `tower` on `images`, from open_clip's own blocks."""
    x, grid = aclip.embed(tower, images)
    for block in tower.transformer.resblocks[:-1]:
        x = block(x)
    return baselines.LastBlockInput(x=x, grid=grid, images=images, image_mean=aclip.OPENAI_MEAN,
                                    image_std=aclip.OPENAI_STD, backend=backend,
                                    vfm=None if vfm is None else aclip.as_vfm(vfm))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", FUSED_BASELINES)
def test_fused_backend_features_equal_the_reference(name, dtype, backend):
    torch.manual_seed(3)
    tower, dino = tiny_tower(72, seed=3).to(dtype), FakeDino(patch=4).to(dtype)
    images = torch.randn(2, 3, 72, 56, dtype=dtype)  # CLIP grid 9x7, VFM grid 18x14
    with torch.no_grad():
        _, ref = aclip.extract(tower, images, baseline=name, shallow_layers=(0,), vfm=dino,
                               backend="reference")
        _, got = aclip.extract(tower, images, baseline=name, shallow_layers=(0,), vfm=dino,
                               backend=backend)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-4, rtol=1e-4)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, **tol)


class LargestTensors(TorchDispatchMode):
    """Records the shape of every tensor any op returns while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out

    @property
    def largest(self) -> int:
        return max(math.prod(s) for s in self.shapes)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("name", FUSED_BASELINES)
def test_no_token_by_token_tensor_in_the_last_block(name, backend):
    """A 224 px crop of a narrow tower (28 x 28 patches, width 64): with a fused backend no op of
    the last block creates a tensor of T x T elements or more (T tokens: 785 on CLIP's grid,
    3136 on the VFM's for proxyclip), while every legitimate one is far smaller (the MLP's
    [785, 256]). The reference backend, which does build the T x T scores, shows the check bites."""
    torch.manual_seed(4)
    tower, dino = tiny_tower(224, seed=4), FakeDino(patch=4)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        inp = last_block_input(tower, images, backend, dino if name == "proxyclip" else None)
        with LargestTensors() as seen:
            tokens, grid = baselines.run_baseline(name, tower.transformer.resblocks[-1], inp)
    T = grid[0] * grid[1] + (name != "proxyclip")
    assert tokens.shape[1] == grid[0] * grid[1] and T in (785, 3136)
    square = [s for s in seen.shapes if len(s) >= 2 and s[-2:] == (T, T)]
    if backend == "reference":
        assert square and seen.largest >= T * T
    else:
        assert not square and seen.largest < T * T / 2, (seen.largest, T)
