"""The CUDA kernels of SC-CLIP's similarity ops (csrc/cuda/similarity_fwd.cuh) without a GPU: run by
the host emulator of tests/cuda_emulator through the same host code as armfast._C_cuda, against
float64 formulas, with inputs as strided views inside NaN-filled buffers and outputs inside
sentinel-filled ones, threads also scheduled in reverse order; thresholds placed between two cosines a few 1e-5 apart, so a decision taken
in less than float32 (one TF32 product) fails. Needs a C++ compiler and the CUDA headers."""
from __future__ import annotations

import ctypes

import pytest
import torch

from helpers.emulator import (DTYPE_CODE, DTYPE_IDS, DTYPES, H100, SENTINEL, Emulator,
                              assert_close_to_truth, build_emulator, guarded, untouched_outside)
from helpers.internals import affinity
from helpers.sc_clip_math import (alternating_values, cosines_f64, dual_softmax_f64,
                                  near_threshold_features, similarity_f64)
from helpers.similarity_math import count_near, near_threshold_aggregation, near_threshold_dual

NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32 (tf32)"}


class SimilarityEmulator(Emulator):
    def __init__(self, path):
        super().__init__(path)
        for name in ("emu_similarity_aggregation_forward", "emu_averaged_dual_softmax_forward"):
            getattr(self.lib, name).restype = ctypes.c_char_p

    @staticmethod
    def _f32(t):
        return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))

    def aggregation(self, f, rnorm, x, out, rowsum, threshold, *, smem, sms, reverse=False):
        self._register(f, rnorm, x, out, rowsum)
        self.lib.emu_set_reverse_schedule(int(reverse))
        B, N, C = f.shape
        self._check(self.lib.emu_similarity_aggregation_forward(
            DTYPE_CODE[f.dtype], self._i64((B, N, C, x.shape[2])), *self._args(f), self._f32(rnorm),
            *self._args(x, out), self._f32(rowsum), ctypes.c_float(threshold), ctypes.c_int64(smem),
            ctypes.c_int(sms)))

    def dual(self, f, rnorm, thresh, k, v, out, lse_mask, lse_kk, scale, gamma, *, smem, sms,
             reverse=False):
        self._register(f, rnorm, thresh, k, v, out, lse_mask, lse_kk)
        self.lib.emu_set_reverse_schedule(int(reverse))
        B, N, C = f.shape
        self._check(self.lib.emu_averaged_dual_softmax_forward(
            DTYPE_CODE[f.dtype], self._i64((B, N, C, k.shape[1], k.shape[3])), *self._args(f),
            self._f32(rnorm), self._f32(thresh), *self._args(k, v, out), self._f32(lse_mask),
            self._f32(lse_kk), ctypes.c_float(scale), ctypes.c_float(gamma), ctypes.c_int64(smem),
            ctypes.c_int(sms)))

    def kernels(self):
        return [launch[0] for launch in self.launches()]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulator(tmp_path_factory, SimilarityEmulator)


def _in_nan_buffer(t, layout):
    """t [B, N, W] as a view inside a NaN-filled buffer: 'map' (a [B, W, N] map seen as [B, N, W])
    or 'every_other' (inner stride 2)."""
    B, N, W = t.shape
    if layout == "map":
        buf = torch.full((B * W * N + 64,), float("nan"), dtype=t.dtype)
        view = buf[32:32 + B * W * N].view(B, W, N).transpose(1, 2)
    else:
        buf = torch.full((B * N * 2 * W + 64,), float("nan"), dtype=t.dtype)
        view = buf[32:32 + B * N * 2 * W].view(B, N, 2 * W)[..., ::2]
    view.copy_(t)
    return view


def _sentinel_out(shape, dtype):
    buf = torch.full((torch.Size(shape).numel() + 64,), SENTINEL, dtype=dtype)
    return buf[32:32 + torch.Size(shape).numel()].view(shape), buf


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("N,C,D,reverse", [(70, 80, 200, False), (1, 16, 24, False), (37, 48, 128, False),
                                           (70, 80, 136, True)])
def test_similarity_aggregation(emu, dtype, N, C, D, reverse):
    g = torch.Generator().manual_seed(N + C)
    f, threshold = near_threshold_aggregation(2, N, C, dtype=dtype, generator=g)
    x = torch.randn(2, N, D, generator=g, dtype=torch.float64).to(dtype)
    if N > 1:
        below, above = count_near(cosines_f64(f), threshold)
        assert below > 0 and above > 0
    f, x = _in_nan_buffer(f, "map"), _in_nan_buffer(x, "every_other")
    out, ob = _sentinel_out((2, N, D), dtype)
    rowsum = torch.full((2, N), float("nan"))
    rnorm, _ = affinity.first_pass(f, 0.0)
    emu.aggregation(f, rnorm, x, out, rowsum, threshold, reverse=reverse, **H100)
    assert untouched_outside(out, ob, SENTINEL)
    S = cosines_f64(f)
    W = S * (S >= threshold)
    # PyTorch with the kernel's roundings: W in dtype for the product with x
    peer = (W.float().to(dtype).float() @ x.float()) / (W.float().sum(-1, keepdim=True) + 1e-6)
    assert_close_to_truth(out, similarity_f64(f, x, threshold), peer, "aggregation")
    torch.testing.assert_close(rowsum.double(), W.sum(-1), atol=1e-4, rtol=1e-5)
    assert emu.kernels() == [f"similarity_aggregation_fwd_kernel<{NAME[dtype]}>"]


def _peer_softmax(scores, v, dtype):
    return torch.softmax(scores.float(), dim=-1).to(dtype).float() @ v.float()


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("N,H,d,layout,reverse", [
    (70, 2, 64, "heads_inner", False), (37, 1, 128, "every_other", False), (33, 3, 32, "contiguous", False),
    (1, 1, 64, "contiguous", False), (70, 1, 128, "heads_inner", True)])
def test_averaged_dual_softmax(emu, dtype, N, H, d, layout, reverse):
    g = torch.Generator().manual_seed(N + d)
    f, beta = near_threshold_dual(2, N, 40, dtype=dtype, generator=g)
    S = cosines_f64(f)
    if N > 2:
        below, above = count_near(S, beta * float(S[0].mean()))
        assert below > 0 and above > 0
    f = _in_nan_buffer(f, "map")
    (k, _), (v, _) = (guarded((2, H, N, d), dtype, float("nan"), layout, g) for _ in range(2))
    out, ob = guarded((2, H, N, d), dtype, SENTINEL, "heads_inner" if layout == "contiguous" else "contiguous")
    lse_mask, lse_kk = (torch.full((2, H, N), float("nan")) for _ in range(2))
    rnorm, thresh = affinity.first_pass(f, beta)
    scale, gamma = d ** -0.5, 2.5
    emu.dual(f, rnorm, thresh, k, v, out, lse_mask, lse_kk, scale, gamma, reverse=reverse, **H100)
    assert untouched_outside(out, ob, SENTINEL)

    A = gamma * (S - beta * S.mean(dim=(1, 2), keepdim=True))
    A = A.masked_fill((A < 0) & ~torch.eye(N, dtype=torch.bool), float("-inf")).unsqueeze(1)
    kk = k.double() @ k.double().transpose(-1, -2) * scale
    peer = (_peer_softmax(A, v, dtype) + _peer_softmax(kk, v, dtype)) / 2
    truth = dual_softmax_f64(f, k, v, scale=scale, gamma=gamma, beta=beta)
    assert_close_to_truth(out, truth, peer, "averaged_dual_softmax")
    lse_tol = dict(atol=2e-2, rtol=1e-3) if dtype == torch.float32 else dict(atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(lse_mask.double(), torch.logsumexp(A, -1).expand(-1, H, -1), **lse_tol)
    torch.testing.assert_close(lse_kk.double(), torch.logsumexp(kk, -1), **lse_tol)
    assert emu.kernels() == [f"averaged_dual_softmax_fwd_kernel<{NAME[dtype]}>"]


def test_too_little_shared_memory_is_a_clear_error(emu):
    f = torch.randn(1, 8, 16, dtype=torch.float16)
    k = v = torch.randn(1, 1, 8, 64, dtype=torch.float16)
    rnorm, thresh = affinity.first_pass(f, 1.0)
    out = torch.empty_like(k)
    stats = torch.empty(1, 1, 8)
    with pytest.raises(RuntimeError, match="averaged dual softmax kernel for float16 .* needs"):
        emu.dual(f, rnorm, thresh, k, v, out, stats, stats.clone(), 0.125, 3.0, smem=16 * 1024, sms=1)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
def test_exact_pairs_either_side_of_the_threshold(emu, dtype):
    """The pairs of `near_threshold_features` (exact in every dtype, cosines 0.4 +- 2e-4 .. 1e-3)
    with values far apart within each pair: a flipped decision would move the output by ~1."""
    f = near_threshold_features(dtype)
    g = torch.Generator().manual_seed(30)
    x = alternating_values((2, 16, 8), dtype, g)
    out, rowsum = torch.full_like(x, float("nan")), torch.full((2, 16), float("nan"))
    emu.aggregation(f, affinity.first_pass(f, 0.0)[0], x, out, rowsum, 0.4, **H100)
    torch.testing.assert_close(out.double(), similarity_f64(f, x, 0.4), atol=2e-2, rtol=1e-2)

    means = cosines_f64(f).mean(dim=(1, 2))
    beta = 0.4 / float(means[0])
    k = torch.randn(2, 2, 16, 32, dtype=torch.float64, generator=g).to(dtype)
    v = alternating_values((2, 2, 16, 32), dtype, g)
    out = torch.full_like(v, float("nan"))
    stats = [torch.full((2, 2, 16), float("nan")) for _ in range(2)]
    rnorm, thresh = affinity.first_pass(f, beta)
    emu.dual(f, rnorm, thresh, k, v, out, *stats, 32 ** -0.5, 3.0, **H100)
    torch.testing.assert_close(out.double(), dual_softmax_f64(f, k, v, beta=beta), atol=3e-2, rtol=1e-2)
