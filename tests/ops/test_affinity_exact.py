"""masked_affinity_attention decides its mask in float32 on every backend, whatever the input
dtype: within 1.5e-2 max relative error of a float64 oracle on inputs built so that bfloat16
affinities (or a bfloat16 mean) would flip many mask decisions (tests/helpers/affinity_cases.py).

The cpu backend takes float32 and float64 only: it gets the half-rounded inputs widened to
float32 (the same values), so its decisions are checked on the same pairs. The triton backend is
checked in tests/triton/test_triton_affinity_exact.py.
"""
from __future__ import annotations

import pytest
import torch

from armfast import ops
from helpers.affinity_cases import CASES, affinity_case, max_relative_error
from helpers.baseline_math import masked_affinity_f64
from helpers.internals import affinity

TOL = 1.5e-2
HALF = (torch.bfloat16, torch.float16)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _skip_unless_runs(backend: str, device: str) -> None:
    why = ops.backend_status(device).get(backend)
    if why is not None:
        pytest.skip(f"backend {backend!r} does not run on {device}: {why}")


def _check(backend, case, n, dtype, device, B=2, C=768, H=12, d=64, seed=0):
    f, v, beta, gamma = affinity_case(case, B, n, C, H, d, dtype=dtype, device=device,
                                      generator=torch.Generator().manual_seed(seed + n))
    want = masked_affinity_f64(f, v, beta, gamma)
    if backend == "cpu":  # float32 only: the same (rounded) values
        f, v = f.float(), v.float()
    out = ops.masked_affinity_attention(f, v, beta=beta, gamma=gamma, backend=backend)
    assert out.dtype == v.dtype and out.device == v.device
    error = float(max_relative_error(out, want))
    assert error <= TOL, f"{backend} {case} n={n} {dtype}: max relative error {error:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["reference", "sdpa", "cpu", "cuda"])
@pytest.mark.parametrize("n", [7, 197, 784])
def test_half_inputs_decide_the_mask_in_float32(backend, case, dtype, device, n):
    _skip_unless_runs(backend, device)
    _check(backend, case, n, dtype, device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["sdpa", "cpu", "cuda"])
def test_a_large_image_too(backend, device):
    # n = 3136: the VFM grid of a 448-pixel crop; one image, the case densest at the threshold
    _skip_unless_runs(backend, device)
    _check(backend, "near_threshold", 3136, torch.bfloat16, device, B=1, H=2)


def test_the_cases_do_what_they_claim():
    """Every affinity clear of the threshold by more than float32 rounding (near_threshold: by
    8e-4, which bfloat16 rounding exceeds); each case keeps a fair share of the pairs, and a mask decided on
    bfloat16-rounded affinities flips some of them (the mistake these tests exist for)."""
    for case in CASES:
        f, _, beta, _ = affinity_case(case, 2, 197, 768, 1, 8, dtype=torch.bfloat16,
                                      generator=torch.Generator().manual_seed(1))
        s = affinity.affinities(f.double())
        thresh = beta * s.mean(dim=(1, 2))
        off = ~torch.eye(197, dtype=torch.bool)
        kept = (s >= thresh.view(-1, 1, 1))[:, off].double().mean()
        assert 0.03 < kept < 0.6, (case, float(kept))
        margin = (s - thresh.view(-1, 1, 1))[:, off].abs().min()
        assert margin > (8e-4 if case == "near_threshold" else 1e-6), (case, float(margin))
        # the mistake: F.normalize and the matmul in bfloat16, as the sdpa composition once did
        fn = torch.nn.functional.normalize(f, dim=-1)
        rounded = (fn @ fn.transpose(1, 2)).double()
        flips = (rounded >= beta * rounded.mean(dim=(1, 2), keepdim=True)) != (s >= thresh.view(-1, 1, 1))
        assert flips[:, off].sum() > 10, case


def test_first_pass_threshold_is_beta_times_the_mean_affinity():
    f, _, beta, _ = affinity_case("positive_mean", 3, 50, 40, 1, 8,
                                  generator=torch.Generator().manual_seed(2))
    rnorm, thresh = affinity.first_pass(f, beta)
    s = affinity.affinities(f.double())
    assert rnorm.dtype == thresh.dtype == torch.float32
    torch.testing.assert_close(thresh.double(), beta * s.mean(dim=(1, 2)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "sdpa", "cpu", "cuda"])
def test_gradients_flow_through_the_float32_affinities(backend, device):
    # the fused backends' backward recomputes the reference math under autograd, so the
    # affinities must stay differentiable where autograd records (half inputs on CUDA included)
    _skip_unless_runs(backend, device)
    dtype = torch.float32 if backend == "cpu" else torch.bfloat16
    f, v, beta, gamma = affinity_case("positive_mean", 2, 33, 48, 2, 32, dtype=dtype, device=device,
                                      generator=torch.Generator().manual_seed(7))
    f.requires_grad_(True)
    v.requires_grad_(True)
    out = ops.masked_affinity_attention(f, v, beta=beta, gamma=gamma, backend=backend)
    df, dv = torch.autograd.grad(out.float().square().sum(), (f, v))
    assert df.dtype == f.dtype and torch.isfinite(df).all() and df.abs().sum() > 0
    assert dv.dtype == v.dtype and torch.isfinite(dv).all()
