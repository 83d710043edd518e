"""The Triton kernels of the baseline attentions against independent float64 formulas, and the
baselines' features on them against the reference backend. Without a GPU they run under the
interpreter (float32 and float64); the half-precision tests are marked gpu. Everything is made on
DEVICE: the same tests run on a GPU."""
from __future__ import annotations

import pytest
import torch

import armfast.clip as aclip
from armfast import ops
from helpers.baseline_math import (GRIDS, affinity_inputs, gaussian_self_correlation_f64, heads,
                                   masked_affinity_f64, self_correlation_f64,
                                   self_correlation_sum_f64, two_cluster_features)
from helpers.tensors import DEVICE, assert_close

# The interpreter gets float scalars (the softmax scale) in float32, so float64 runs agree with
# float64 math to about 1e-7, not 1e-15.
TOL = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float64: dict(atol=1e-6, rtol=1e-6),
       torch.float16: dict(atol=3e-3, rtol=1e-2), torch.bfloat16: dict(atol=2e-2, rtol=3e-2)}
# float64 runs only under the interpreter; on a GPU float32 alone
DTYPES = (torch.float32, pytest.param(torch.float64, marks=pytest.mark.interpreter_only))
HALF = [pytest.param(dt, marks=pytest.mark.gpu) for dt in (torch.float16, torch.bfloat16)]


def run_all(grid, class_token, dtype, *, B=1, H=2, d=64, strided=True, seed=0):
    """(name, triton output, float64 formula) for the four ops on one grid."""
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1] + class_token
    q, k, v = (t.to(DEVICE) for t in heads(B, H, N, d, dtype=dtype, strided=strided, generator=g))
    f, fv, beta = affinity_inputs(B, grid[0] * grid[1], 48, H, d, dtype=dtype, strided=strided,
                                  generator=g)
    f, fv = f.to(DEVICE), fv.to(DEVICE)
    return [
        ("self_correlation", ops.self_correlation(q, v, backend="triton"), self_correlation_f64(q, v)),
        ("self_correlation_sum", ops.self_correlation_sum(q, k, v, backend="triton", layout="bnhd"),
         self_correlation_sum_f64(q, k, v).transpose(1, 2)),
        ("gaussian_self_correlation",
         ops.gaussian_self_correlation(k, v, grid=grid, class_token=class_token, backend="triton"),
         gaussian_self_correlation_f64(k, v, grid, class_token=class_token)),
        ("masked_affinity_attention", ops.masked_affinity_attention(f, fv, beta=beta, backend="triton"),
         masked_affinity_f64(f, fv, beta)),
    ]


def _check(results, dtype):
    for name, got, want in results:
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close(got, want, **TOL[dtype], name=name)


@pytest.mark.parametrize("grid", GRIDS)
def test_matches_float64_formulas(grid):
    big = grid[0] * grid[1] > 400  # one head of 32 keeps the interpreter's time down
    _check(run_all(grid, True, torch.float32, B=1 if big else 2, H=1 if big else 2,
                   d=32 if big else 64, seed=sum(grid)), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", [(1, 1), (7, 5), (5, 9)])
def test_without_class_token_and_dtypes(grid, dtype):
    _check(run_all(grid, False, dtype, d=40, seed=3), dtype)


def test_gaussian_sigma_scale_and_masked_first_tiles():
    g = torch.Generator().manual_seed(4)
    x, v = (t.to(DEVICE) for t in heads(2, 3, 1 + 6 * 11, 16, generator=g, count=2))
    got = ops.gaussian_self_correlation(x, v, grid=(6, 11), sigma=1.5, scale=0.3, backend="triton")
    assert_close(got, gaussian_self_correlation_f64(x, v, (6, 11), sigma=1.5, scale=0.3),
                 **TOL[torch.float32], name="gaussian")
    # rows of the second group see only masked keys in their first key tiles
    f = two_cluster_features(70, 40, generator=g).to(DEVICE)
    v = torch.randn(1, 2, 110, 8, generator=g).to(DEVICE)
    assert_close(ops.masked_affinity_attention(f, v, backend="triton"), masked_affinity_f64(f, v),
                 **TOL[torch.float32], name="masked first tiles")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("grid", [(14, 14), (28, 28), (5, 9)])
def test_half_precision_on_gpu(grid, dtype):
    _check(run_all(grid, True, dtype, B=2, H=12, d=64, seed=5), dtype)


@pytest.mark.parametrize("name", ["sclip", "clearclip", "naclip", "proxyclip"])
def test_baseline_features_equal_the_reference(name):
    from helpers.clip_models import tiny_tower
    from helpers.clip_models import FakeDino

    torch.manual_seed(6)
    tower, dino = tiny_tower(72, seed=6).to(DEVICE), FakeDino(patch=4).to(DEVICE)
    images = torch.randn(2, 3, 72, 56, device=DEVICE)
    with torch.no_grad():
        _, ref = aclip.extract(tower, images, baseline=name, shallow_layers=(0,), vfm=dino,
                               backend="reference")
        _, got = aclip.extract(tower, images, baseline=name, shallow_layers=(0,), vfm=dino,
                               backend="triton")
    assert_close(got, ref, atol=2e-4, rtol=1e-4, name=name)


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Every variant (ClearCLIP, SCLIP, NACLIP, ProxyCLIP, SC-CLIP's two ops) compiles to sm_90 code
    without a GPU; SC-CLIP's kernels spill nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    backends = pytest.importorskip("triton.backends")
    if "nvidia" not in getattr(backends, "backends", {}):
        pytest.skip("this Triton has no NVIDIA backend")
    script = Path(__file__).resolve().parents[2] / "tools" / "compile_baselines_for_gpu.py"
    result = subprocess.run([sys.executable, str(script), "--arch", "90", "--dtype", "bfloat16",
                             "--head-dim", "64"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("  ")]
    kernels = {row[0] for row in rows}
    assert kernels == {"self_corr_fwd", "masked_affinity_fwd", "similarity_aggregation_fwd",
                       "averaged_dual_softmax_fwd"}, result.stdout[-2000:]
    # every config of the three self-correlation variants, of the affinity kernel and of SC-CLIP's
    # two kernels, on tensor cores
    assert len(rows) >= 3 * 4 + 5 + 4 + 4 and all("mma.sync=1" in line or "wgmma=1" in line
                                                   for line in result.stdout.splitlines()
                                                   if line.startswith("  "))
    sc_clip = [line for line in result.stdout.splitlines()
               if line.split()[:1] in (["similarity_aggregation_fwd"], ["averaged_dual_softmax_fwd"])]
    assert sc_clip and all("spill=   0" in line for line in sc_clip), "\n".join(sc_clip)
