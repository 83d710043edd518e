"""The cuda backend's baseline attentions on a GPU (marked gpu: skipped without one) against
float64 formulas, at ViT-B/16 sizes and awkward grids, and the baselines' features on them.
Without a GPU, tests/ops/test_cuda_baseline_emulated.py runs the same kernels in the emulator."""
from __future__ import annotations

import pytest
import torch

from armfast import ops
from helpers.baseline_math import (GRIDS, affinity_inputs, gaussian_self_correlation_f64, heads,
                                   masked_affinity_f64, self_correlation_f64,
                                   self_correlation_sum_f64, two_cluster_features)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_backend_on_tf32")]

TOL = {torch.float16: dict(atol=4e-3, rtol=1e-2), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float32: dict(atol=5e-3, rtol=1e-2)}  # float32 on TF32


def _close(got, want, dtype, name):
    assert got.dtype == dtype and got.shape == want.shape, name
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grid", GRIDS)
def test_matches_float64(grid, dtype):
    g = torch.Generator().manual_seed(sum(grid))
    N = grid[0] * grid[1] + 1
    q, k, v = (t.cuda() for t in heads(2, 12, N, 64, dtype=dtype, strided=True, generator=g))
    _close(ops.self_correlation(q, v, backend="cuda"), self_correlation_f64(q, v), dtype, "clearclip")
    _close(ops.self_correlation_sum(q, k, v, backend="cuda", layout="bnhd"),
           self_correlation_sum_f64(q, k, v).transpose(1, 2), dtype, "sclip")
    _close(ops.gaussian_self_correlation(k, v, grid=grid, backend="cuda"),
           gaussian_self_correlation_f64(k, v, grid), dtype, "naclip")
    x, vx = (t.cuda() for t in heads(1, 2, N - 1, 32, dtype=dtype, generator=g, count=2))
    _close(ops.gaussian_self_correlation(x, vx, grid=grid, class_token=False, sigma=2.0, backend="cuda"),
           gaussian_self_correlation_f64(x, vx, grid, sigma=2.0, class_token=False), dtype, "naclip no cls")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_masked_affinity(dtype):
    g = torch.Generator().manual_seed(1)
    f = two_cluster_features(700, 300, C=768, dtype=dtype, generator=g).cuda()
    v = torch.randn(1, 12, 1000, 64, generator=g).to(dtype).cuda()
    _close(ops.masked_affinity_attention(f, v, backend="cuda"), masked_affinity_f64(f, v), dtype, "proxyclip")
    if dtype == torch.float32:  # a threshold inside the affinities' widest gap, full float32 inputs
        f, v, beta = affinity_inputs(2, 784, 768, 12, 64, strided=True, generator=g)
        _close(ops.masked_affinity_attention(f.cuda(), v.cuda(), beta=beta, backend="cuda"),
               masked_affinity_f64(f, v, beta), dtype, "proxyclip gap")


def test_float32_at_highest_precision_is_refused():
    torch.set_float32_matmul_precision("highest")
    x = torch.randn(1, 1, 5, 32, device="cuda")
    with pytest.raises(TypeError, match="TF32 tensor cores only"):
        ops.self_correlation(x, x, backend="cuda")


@pytest.mark.parametrize("name", ["sclip", "clearclip", "naclip", "proxyclip"])
def test_baseline_features_equal_the_reference(name):
    import armfast.clip as aclip
    from helpers.clip_models import tiny_tower
    from helpers.clip_models import FakeDino

    torch.manual_seed(2)
    tower, dino = tiny_tower(224, seed=2).cuda().half(), FakeDino(patch=8).cuda().half()
    images = torch.randn(2, 3, 224, 224, device="cuda").half()
    with torch.no_grad():
        _, ref = aclip.extract(tower, images, baseline=name, shallow_layers=(0,), vfm=dino, backend="reference")
        _, got = aclip.extract(tower, images, baseline=name, shallow_layers=(0,), vfm=dino, backend="cuda")
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
