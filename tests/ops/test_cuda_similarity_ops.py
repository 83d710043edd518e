"""The cuda backend's SC-CLIP ops on a GPU (marked gpu: skipped without one) against float64
formulas, at ViT-B/16 sizes and awkward lengths, with thresholds placed between two cosines a few
1e-5 apart. Without a GPU, tests/ops/test_cuda_similarity_emulated.py runs the same kernels in the
emulator."""
from __future__ import annotations

import pytest
import torch

from armfast import ops
from helpers.sc_clip_math import dual_softmax_f64, similarity_f64
from helpers.similarity_math import near_threshold_aggregation, near_threshold_dual, values

pytestmark = [pytest.mark.gpu,
              pytest.mark.usefixtures("cuda_backend_on_tf32", "poisoned_allocations")]

TOL = {torch.float16: dict(atol=4e-3, rtol=1e-2), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float32: dict(atol=5e-3, rtol=1e-2)}  # float32 on TF32 (S in 3xTF32)
DEVICE = torch.device("cuda")


def _close(got, want, dtype, name):
    assert got.dtype == dtype and got.shape == want.shape, name
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **TOL[dtype],
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,d", [(1, 64), (7, 32), (197, 64), (785, 64), (197, 128)])
def test_matches_float64_near_thresholds(N, d, dtype):
    g = torch.Generator().manual_seed(N + d)
    f, threshold = near_threshold_aggregation(2, N, 96, dtype=dtype, generator=g)
    x = values((2, N, 200), dtype=dtype, strided=True, generator=g)
    f, x = f.to(DEVICE), x.to(DEVICE)
    _close(ops.similarity_aggregation(f, x, threshold=threshold, backend="cuda"),
           similarity_f64(f, x, threshold), dtype, "similarity_aggregation")
    fd, beta = near_threshold_dual(2, N, 96, dtype=dtype, generator=g)
    qkv = values((2, N, 3 * 4 * d), dtype=dtype, generator=g).view(2, N, 3, 4, d).permute(2, 0, 3, 1, 4)
    fd, k, v = fd.to(DEVICE), qkv[1].to(DEVICE), qkv[2].to(DEVICE)
    _close(ops.averaged_dual_softmax(fd, k, v, beta=beta, backend="cuda"),
           dual_softmax_f64(fd, k, v, beta=beta), dtype, "averaged_dual_softmax")


def test_float32_at_highest_precision_is_refused_with_a_clear_error():
    torch.set_float32_matmul_precision("highest")
    f = torch.randn(1, 8, 16, device=DEVICE)
    with pytest.raises(TypeError, match="similarity_aggregation in float32 on TF32"):
        ops.similarity_aggregation(f, f, backend="cuda")
