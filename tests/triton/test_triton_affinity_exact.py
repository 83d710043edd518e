"""The Triton ProxyCLIP kernel decides its mask in float32: within 1.5e-2 max relative error of a
float64 oracle on inputs built so that bfloat16 affinities would flip many decisions
(tests/helpers/affinity_cases.py). On a GPU in bfloat16 and float16; under the interpreter (which
runs float32 only) on the half-rounded values widened to float32, the same pairs to decide."""
from __future__ import annotations

import pytest
import torch

from armfast import ops
from helpers.affinity_cases import CASES, affinity_case, max_relative_error
from helpers.baseline_math import masked_affinity_f64
from helpers.tensors import DEVICE

TOL = 1.5e-2
HALF = [pytest.param(dt, marks=pytest.mark.gpu, id=str(dt)) for dt in (torch.float16, torch.bfloat16)]
ROUNDED = [pytest.param(dt, id=f"float32-of-{dt}") for dt in (torch.float16, torch.bfloat16)]


def _check(case, n, dtype, run_dtype, *, B=2, C=768, H=1, d=32, seed=0):
    f, v, beta, gamma = affinity_case(case, B, n, C, H, d, dtype=dtype, device=DEVICE,
                                      generator=torch.Generator().manual_seed(seed + n))
    want = masked_affinity_f64(f, v, beta, gamma)
    out = ops.masked_affinity_attention(f.to(run_dtype), v.to(run_dtype), beta=beta, gamma=gamma,
                                        backend="triton")
    assert out.dtype == run_dtype and out.device == f.device
    error = float(max_relative_error(out, want))
    assert error <= TOL, f"triton {case} n={n} {dtype}: max relative error {error:.3g}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [7, 197])
@pytest.mark.parametrize("dtype", HALF)
def test_half_inputs(case, n, dtype):
    _check(case, n, dtype, dtype, H=12 if DEVICE.type == "cuda" else 1,
           d=64 if DEVICE.type == "cuda" else 32)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [7, 197])
@pytest.mark.parametrize("dtype", ROUNDED)
def test_half_rounded_values_in_float32(case, n, dtype):
    _check(case, n, dtype, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_crop_of_784_patches(case):
    # a ViT-B/8 VFM's grid of a 224-pixel crop; on a GPU in bfloat16 with all 12 heads
    half = DEVICE.type == "cuda"
    _check(case, 784, torch.bfloat16, torch.bfloat16 if half else torch.float32, B=1,
           H=12 if half else 1, d=64 if half else 32)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over a NaN row
def test_a_nan_feature_poisons_its_image_as_in_the_reference():
    f, v, beta, gamma = affinity_case("positive_mean", 2, 40, 64, 1, 32, device=DEVICE,
                                      generator=torch.Generator().manual_seed(3))
    f[1, 9, 5] = float("nan")
    want = ops.masked_affinity_attention(f, v, beta=beta, gamma=gamma, backend="reference").isnan()
    got = ops.masked_affinity_attention(f, v, beta=beta, gamma=gamma, backend="triton").isnan()
    assert want[1].all() and not want[0].any()
    assert torch.equal(got, want)
