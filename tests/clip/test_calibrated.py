"""SC-CLIP, SFP and ResCLIP against float64 oracles written from their official code
(`helpers.calibrated_oracle`), on a randomly initialised ViT-B/16 at a square and a non-square
crop; batches against single images; the discrete decisions near their thresholds."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import armfast.clip as aclip
from armfast import ops as aclip_ops
from armfast.clip import baselines, blocks, calibrated, outliers
from helpers import calibrated_oracle as oracle
from helpers.clip_models import vit_b16

NAMES = ("scclip", "sfp", "resclip")
CROPS = ((224, 224), (224, 288))  # grids 14 x 14 and 14 x 18


@pytest.fixture(scope="module")
def tower64():
    return copy.deepcopy(vit_b16().visual).double()


def structured_images(crop, seed=0):
    """Two images of a few flat regions plus noise: a random tower then gives patch tokens with
    cosines on both sides of 0.4 (pure noise would leave only the diagonal above it)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=g)
    noise = torch.randn(2, 3, *crop, dtype=torch.float64, generator=g)
    return F.interpolate(low, size=crop, mode="nearest") + 0.3 * noise


@pytest.fixture(scope="module", params=CROPS, ids=lambda c: f"{c[0]}x{c[1]}")
def case(request, tower64):
    """(images, per-image oracle states, the batch's LastBlockInput built from those states)."""
    images = structured_images(request.param)
    with torch.no_grad():
        states = [oracle.tower_pass(tower64, images[i:i + 1]) for i in range(2)]
    depth = len(tower64.transformer.resblocks)
    hidden = {i: torch.cat([s[0][i].transpose(0, 1) for s in states]) for i in range(depth - 1)}
    maps = {i: torch.cat([s[1][i] for s in states]) for i in range(depth - 1)}
    inp = baselines.LastBlockInput(
        x=hidden[depth - 2], grid=states[0][2], images=images, image_mean=aclip.OPENAI_MEAN,
        image_std=aclip.OPENAI_STD, backend="reference", hidden=hidden, attention=maps, depth=depth)
    return images, states, inp


def deep(visual, tokens):
    return visual.ln_post(tokens) @ visual.proj


def _slice(inp, i):
    one = slice(i, i + 1)
    return baselines.LastBlockInput(
        x=inp.x[one], grid=inp.grid, images=inp.images[one], image_mean=inp.image_mean,
        image_std=inp.image_std, backend=inp.backend, depth=inp.depth,
        hidden={k: v[one] for k, v in inp.hidden.items()},
        attention={k: v[one] for k, v in inp.attention.items()})


@pytest.mark.parametrize("name", NAMES)
def test_last_block_matches_official(name, tower64, case):
    """A batch of two against the official code run on each image alone."""
    _, states, inp = case
    block = tower64.transformer.resblocks[-1]
    with torch.no_grad():
        tokens, grid = baselines.run_baseline(name, block, inp)
        got = deep(tower64, tokens)
        ref = torch.stack([oracle.features(name, tower64, s) for s in states])
    assert grid == inp.grid and got.shape == (2, grid[0] * grid[1], 512)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ref[0], ref[1], atol=1e-3)  # two different images


@pytest.mark.parametrize("name", ["scclip", "sfp"])
def test_batch_equals_single_images(name, tower64, case):
    """The per-image parts (outlier search, mean of S, head layout) do not mix the batch."""
    _, _, inp = case
    block = tower64.transformer.resblocks[-1]
    with torch.no_grad():
        both, _ = baselines.run_baseline(name, block, inp)
        singles = torch.cat([baselines.run_baseline(name, block, _slice(inp, i))[0] for i in range(2)])
    torch.testing.assert_close(both, singles, rtol=1e-12, atol=1e-12)


def test_the_cases_exercise_every_branch(case):
    """Outliers found by both detectors, cosines on both sides of 0.4, masked entries."""
    _, states, inp = case
    for feats, maps, grid in states:
        assert len(oracle.lof(feats[-1][1:].squeeze(1))) > 0
        assert len(oracle.sfp_outliers(maps[-1], grid)) == 10
    cos = calibrated._cosine(inp.hidden[8][:, 1:])
    kept = (cos >= calibrated.THRESHOLD).double().mean()
    assert 0.1 < kept < 0.9


@pytest.mark.parametrize("name,crop", [("sfp", (224, 288)), ("resclip", (224, 224))])
def test_extract_matches_official(name, crop, tower64):
    """`armfast.clip.extract` end to end: block outputs and attention maps collected on the way."""
    images = structured_images(crop, seed=5)
    with torch.no_grad():
        _, got = aclip.extract(tower64, images, baseline=name, shallow_layers=(4,),
                               backend="reference")
        ref = torch.stack([oracle.features(name, tower64, oracle.tower_pass(tower64, images[i:i + 1]))
                           for i in range(2)])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_resclip_lambda_and_tau(tower64, case):
    _, states, inp = case
    block = tower64.transformer.resblocks[-1]
    with torch.no_grad():
        tokens, _ = baselines.run_baseline("resclip", block, inp, {"rcs_lambda": 0.6, "rcs_tau": 1.5})
        ref = torch.stack([oracle.features("resclip", tower64, s, tau=1.5, lam=0.6) for s in states])
        default, _ = baselines.run_baseline("resclip", block, inp)
    torch.testing.assert_close(deep(tower64, tokens), ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(tokens, default)
    with pytest.raises(ValueError, match="rcs_lambda must be in"):
        baselines.run_baseline("resclip", block, inp, {"rcs_lambda": 1.5})
    with pytest.raises(ValueError, match="has no option gamma"):
        baselines.run_baseline("resclip", block, inp, {"gamma": 1.0})


def test_missing_blocks_are_named(tower64, case):
    _, _, inp = case
    bare = baselines.LastBlockInput(x=inp.x, grid=inp.grid, images=inp.images,
                                    image_mean=inp.image_mean, image_std=inp.image_std)
    for name, what in (("scclip", "hidden"), ("sfp", "hidden"), ("resclip", "attention")):
        with pytest.raises(ValueError, match=rf"{name}.*reads {what}\["):
            baselines.run_baseline(name, tower64.transformer.resblocks[-1], bare)


def test_towers_too_shallow_are_refused():
    from helpers.clip_models import tiny_tower

    with pytest.raises(ValueError, match="this tower has 3 blocks"):
        aclip.extract(tiny_tower(32), torch.randn(1, 3, 32, 32), baseline="resclip",
                      shallow_layers=(0,))


# --- outliers: the settled rules and the decisions near their thresholds ----------------------

def test_grid_cell_of_a_token_uses_the_width():
    """On a 2 x 3 grid token 4 is row 1, column 1 (the official code divides by the height)."""
    tokens = torch.arange(6, dtype=torch.float64).view(1, 6, 1).repeat(1, 1, 2) * 10
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 4] = True
    out = outliers.repair_outliers(tokens, mask, (2, 3))
    # 8-neighbours of (1, 1) on [[0, 1, 2], [3, 4, 5]]: 0, 1, 2, 3, 5
    assert out[0, 4, 0].item() == pytest.approx(10 * (0 + 1 + 2 + 3 + 5) / 5)
    keep = [0, 1, 2, 3, 5]
    torch.testing.assert_close(out[0, keep], tokens[0, keep])


def test_outlier_without_neighbours_keeps_its_value():
    tokens = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [False] * 4])
    torch.testing.assert_close(outliers.repair_outliers(tokens, mask, (2, 2)), tokens)


def test_lof_scores_match_the_official_formula_and_clamp_k():
    x = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(outliers.lof_outliers(x).nonzero().flatten(), oracle.lof(x))
    assert outliers.lof_scores(x[:6]).shape == (6,)  # k = 30 clamped to 5
    torch.testing.assert_close(outliers.lof_scores(x[:6]), outliers.lof_scores(x[:6], 5))
    assert not outliers.lof_outliers(x[:1]).any()


def test_quantile_is_taken_in_the_scores_precision():
    """Score 19 sits 1e-11 above score 18: alone above the float64 0.95 quantile, while the
    quantile of the scores rounded to float32 (the official code) lands elsewhere."""
    scores = torch.linspace(1.0, 2.0, 20, dtype=torch.float64)
    scores[19] = scores[18] + 1e-11
    assert outliers.quantile_outliers(scores).nonzero().flatten().tolist() == [19]
    official = scores > torch.quantile(scores.to(torch.float32), 0.95)
    assert official.nonzero().flatten().tolist() != [19]


def test_lof_is_decided_in_float32_for_half_tokens():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    scores = outliers.lof_scores(x)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, outliers.lof_scores(x.float()), rtol=0, atol=0)


def _attention_with_margins(margins):
    """[2 heads, 1 + N, 1 + N] maps whose head-mean class attention c_j (after the 1.5 scale)
    exceeds the self-attention d_j = 0.3 by margins[j]."""
    n = len(margins)
    a = torch.full((2, 1 + n, 1 + n), 0.01, dtype=torch.float64)
    for j, m in enumerate(margins):
        a[:, 1 + j, 1 + j] = 0.3
        a[:, 0, 1 + j] = (0.3 + m) / 1.5
    return a


def test_class_attention_outliers_near_the_tie():
    """Margins of +-2e-5 relative: beyond float32's resolution, within float16's. The maps given
    in float16 are decided in float32 on their float16 values, as in float64."""
    margins = [2e-5, -2e-5, 0.05, 0.0, 0.01]
    a = _attention_with_margins(margins)
    assert outliers.class_attention_outliers(a).tolist() == [True, False, True, False, True]
    half = a.half()
    truth = outliers.class_attention_outliers(half.double())
    assert outliers.class_attention_outliers(half).tolist() == truth.tolist()


def test_class_attention_keeps_the_top_ten():
    margins = [0.001 * (j + 1) for j in range(12)] + [-0.1]
    mask = outliers.class_attention_outliers(_attention_with_margins(margins))
    assert mask.nonzero().flatten().tolist() == list(range(2, 12))


def _vectors_with_cosine_near(target, side):
    """Two small-integer vectors (exact in bfloat16) whose cosine is 2e-6 to 3e-4 from target
    (far beyond float32's rounding, within bfloat16's), above it (side > 0) or below."""
    best = None
    for a in range(1, 256):
        for b in range(1, 256):
            c = a / (a * a + b * b) ** 0.5  # cos of (1, 0) and (a, b)
            gap = (c - target) * side
            if 2e-6 < gap < 3e-4 and (best is None or gap < best[0]):
                best = (gap, a, b)
    _, a, b = best
    return torch.tensor([[1.0, 0.0], [float(a), float(b)]])


@pytest.mark.parametrize("side", [1, -1])
def test_similarity_threshold_decided_in_float32(side):
    f = _vectors_with_cosine_near(calibrated.THRESHOLD, side)[None]
    truth = bool(calibrated._cosine(f.double())[0, 0, 1] >= calibrated.THRESHOLD)
    assert truth == (side > 0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        cos = calibrated._cosine(f.to(dtype))
        assert cos.dtype == torch.float32
        assert bool(cos[0, 0, 1] >= calibrated.THRESHOLD) == truth, dtype


# --- the fused backends behind the last block ----------------------------------------------------

FUSED = [pytest.param(b, marks=pytest.mark.skipif(
    aclip_ops.backend_status("cpu")[b] is not None, reason=f"{b} backend unavailable"))
    for b in ("cpu",)]


@pytest.fixture(scope="module")
def case32():
    """The last block's input of the float32 ViT-B/16 on two 224 x 288 crops."""
    visual = vit_b16().visual
    images = structured_images((224, 288), seed=7).float()
    with torch.no_grad():
        x, grid = aclip.embed(visual, images)
        hidden, maps = {}, {}
        for i, blk in enumerate(visual.transformer.resblocks[:-1]):
            x, maps[i] = blocks.forward_with_attention(blk, x)
            hidden[i] = x
    return visual, baselines.LastBlockInput(
        x=x, grid=grid, images=images, image_mean=aclip.OPENAI_MEAN, image_std=aclip.OPENAI_STD,
        backend="reference", hidden=hidden, attention=maps, depth=len(visual.transformer.resblocks))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", NAMES)
def test_fused_backend_equals_the_reference_float32(name, backend, case32):
    visual, inp = case32
    block = visual.transformer.resblocks[-1]
    with torch.no_grad():
        ref, _ = baselines.run_baseline(name, block, inp)
        got, _ = baselines.run_baseline(name, block, dataclasses.replace(inp, backend=backend))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_flat_crop_gives_finite_features(name):
    """A crop of one colour (the patches differ only by their positions): finite features."""
    images = torch.full((1, 3, 48, 64), 0.5)
    with torch.no_grad():
        _, deep = aclip.extract(vit_b16(), images, baseline=name)
    assert torch.isfinite(deep).all()


def test_mask_keeps_the_diagonal_where_a_whole_row_falls_below_the_mean():
    """Row 0 sits 1e-6 under the mean everywhere (a near-flat crop): the official mask is all
    -inf there (NaN after softmax); the diagonal is kept instead."""
    s = torch.ones(1, 3, 3, dtype=torch.float64)
    s[0, 0] = 1 - 1e-6
    p = calibrated._mask_softmax(s)
    torch.testing.assert_close(p[0, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(p[0, 1:], torch.full((2, 3), 1 / 3, dtype=torch.float64))


def test_decisions_stay_float32_under_autocast():
    """CPU autocast runs matmuls in bfloat16: the cosines, the attention maps and the LOF
    distances the decisions read do not follow it."""
    g = torch.Generator().manual_seed(4)
    f = torch.randn(1, 30, 16, generator=g)
    q, k = torch.randn(2, 1, 2, 9, 8, generator=g).unbind(0)
    plain = (calibrated._cosine(f), blocks.attention_probs(q, k), outliers.lof_scores(f[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = (calibrated._cosine(f), blocks.attention_probs(q, k), outliers.lof_scores(f[0]))
    for a, b in zip(plain, under):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=0)
