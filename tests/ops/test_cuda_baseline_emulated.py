"""The CUDA kernels of the baseline attentions (csrc/cuda/baseline_fwd.cuh) without a GPU: run by
the host emulator of tests/cuda_emulator (see tests/ops/test_cuda_emulated.py) through the same host
code as armfast._C_cuda, against float64 formulas, with inputs as strided views inside NaN-filled
buffers and outputs inside sentinel-filled ones. Needs a C++ compiler and the CUDA headers."""
from __future__ import annotations

import ctypes

import pytest
import torch

from helpers.affinity_cases import CASES, affinity_case, max_relative_error
from helpers.internals import affinity
from helpers.baseline_math import (gaussian_self_correlation_f64, grid_gaussian_f64,
                                   masked_affinity_f64, self_correlation_f64,
                                   self_correlation_sum_f64)
from helpers.emulator import (DTYPE_CODE, DTYPE_IDS, DTYPES, H100, SENTINEL, Emulator,
                              assert_close_to_truth, build_emulator, guarded, untouched_outside)


class BaselineEmulator(Emulator):
    def __init__(self, path):
        super().__init__(path)
        for name in ("emu_self_correlation_forward", "emu_masked_affinity_forward"):
            getattr(self.lib, name).restype = ctypes.c_char_p

    def self_correlation(self, x, x2, v, out, scale, grid=None, class_token=True, sigma=5.0, *, smem, sms):
        self._register(*(t for t in (x, x2, v, out) if t is not None))
        x2_args = self._args(x2) if x2 is not None else [None, None]
        self._check(self.lib.emu_self_correlation_forward(
            DTYPE_CODE[x.dtype], self._i64(x.shape), *self._args(x), *x2_args, *self._args(v, out),
            ctypes.c_float(scale), ctypes.c_int64(grid[0] if grid else 0), ctypes.c_int64(grid[1] if grid else 0),
            ctypes.c_int(int(class_token)), ctypes.c_double(sigma), ctypes.c_int64(smem), ctypes.c_int(sms)))

    def masked_affinity(self, f, rnorm, thresh, v, out, gamma, *, smem, sms):
        B, n, C = f.shape
        shape = self._i64((B, n, C, v.shape[1], v.shape[3]))
        self.lib.emu_masked_affinity_workspace.restype = ctypes.c_int64
        size = self.lib.emu_masked_affinity_workspace(shape, ctypes.c_int64(smem), ctypes.c_int(sms))
        # NaN-filled: a workspace element the combine reads before the split kernel writes it shows
        self.workspace = torch.full((max(size, 1),), float("nan"), dtype=torch.float32)
        self._register(f, rnorm, thresh, v, out, self.workspace)
        fp = lambda t: ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))
        self._check(self.lib.emu_masked_affinity_forward(
            DTYPE_CODE[f.dtype], shape, *self._args(f), fp(rnorm), fp(thresh), *self._args(v, out),
            ctypes.c_float(gamma), fp(self.workspace) if size else None, ctypes.c_int64(size),
            ctypes.c_int64(smem), ctypes.c_int(sms)))

    def kernels(self):
        return [launch[0] for launch in self.launches()]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulator(tmp_path_factory, BaselineEmulator)


def _peer(scores, v, dtype, bias=None):
    """The same attention computed by PyTorch in `dtype` (products rounded, softmax in float32)."""
    s = scores.float() if bias is None else scores.float() + bias
    return torch.matmul(torch.softmax(s, dim=-1).to(dtype), v)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("N,d,layout", [(1, 64, "contiguous"), (70, 64, "heads_inner"), (37, 32, "every_other"),
                                        (33, 128, "heads_inner")])
def test_self_correlation(emu, dtype, N, d, layout):
    g = torch.Generator().manual_seed(N + d)
    (x, _), (v, _) = (guarded((1, 2, N, d), dtype, float("nan"), layout, g) for _ in range(2))
    out, ob = guarded((1, 2, N, d), dtype, SENTINEL, "heads_inner")
    scale = d ** -0.5
    emu.self_correlation(x, None, v, out, scale, **H100)
    assert untouched_outside(out, ob, SENTINEL)
    peer = _peer(torch.matmul(x, x.transpose(-1, -2)) * scale, v, dtype)
    assert_close_to_truth(out, self_correlation_f64(x, v), peer, "self_correlation")


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("d", [64, 128])  # TF32 at d = 128 reads Q's fragments from shared memory
def test_self_correlation_sum(emu, dtype, d):
    g = torch.Generator().manual_seed(3)
    q, k, v = (guarded((2, 1, 70, d), dtype, float("nan"), "heads_inner", g)[0] for _ in range(3))
    out, ob = guarded((2, 1, 70, d), dtype, SENTINEL, "contiguous")
    emu.self_correlation(q, k, v, out, 0.125, **H100)
    assert untouched_outside(out, ob, SENTINEL)
    peer = (_peer(torch.matmul(q, q.transpose(-1, -2)) * 0.125, v, dtype)
            + _peer(torch.matmul(k, k.transpose(-1, -2)) * 0.125, v, dtype))
    assert_close_to_truth(out, self_correlation_sum_f64(q, k, v), peer, "self_correlation_sum")
    assert emu.kernels() == [f"self_corr_fwd_kernel<{_name(dtype)}>"]


def _name(dtype):
    return {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32 (tf32)"}[dtype]


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("grid,class_token", [((7, 5), True), ((5, 9), False), ((9, 8), True), ((1, 1), True)])
def test_gaussian_self_correlation(emu, dtype, grid, class_token):
    g = torch.Generator().manual_seed(grid[0] * 10 + grid[1])
    N = grid[0] * grid[1] + class_token
    (x, _), (v, _) = (guarded((1, 2, N, 64), dtype, float("nan"), "heads_inner", g) for _ in range(2))
    out, ob = guarded((1, 2, N, 64), dtype, SENTINEL, "every_other")
    emu.self_correlation(x, None, v, out, 0.125, grid, class_token, 2.0, **H100)
    assert untouched_outside(out, ob, SENTINEL)
    G = grid_gaussian_f64(*grid, 2.0, class_token)
    peer = _peer(torch.matmul(x, x.transpose(-1, -2)) * 0.125, v, dtype, G.float())
    truth = gaussian_self_correlation_f64(x, v, grid, sigma=2.0, class_token=class_token, scale=0.125)
    assert_close_to_truth(out, truth, peer, "gaussian_self_correlation")


def _clustered(sizes, C, dtype, g):
    """Features in groups along orthogonal directions with a little noise: cosines near 1 within
    a group and near 0 across, far from the mask threshold in every precision."""
    f = torch.zeros(1, sum(sizes), C, dtype=torch.float64)
    start = 0
    for i, n in enumerate(sizes):
        f[0, start:start + n, i] = 1.0 + i
        start += n
    f += 0.05 * torch.randn(f.shape, generator=g, dtype=torch.float64)
    return f.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("C,H,d", [(80, 3, 64), (16, 1, 32)])
def test_masked_affinity(emu, dtype, C, H, d):
    g = torch.Generator().manual_seed(C + H)
    f_buf = torch.full((1 * C * 70 + 64,), float("nan"), dtype=dtype)
    f = f_buf[32:32 + C * 70].view(1, C, 70).transpose(1, 2)  # a VFM's [B, C, n] map seen as [B, n, C]
    f.copy_(_clustered((40, 20, 10), C, dtype, g))
    v, _ = guarded((1, H, 70, d), dtype, float("nan"), "heads_inner", g)
    out, ob = guarded((1, H, 70, d), dtype, SENTINEL, "contiguous")
    rnorm, thresh = affinity.first_pass(f, 1.2)
    emu.masked_affinity(f, rnorm, thresh, v, out, 3.0, **H100)
    assert untouched_outside(out, ob, SENTINEL)
    truth = masked_affinity_f64(f, v)
    fn = torch.nn.functional.normalize(f.float(), dim=-1)
    S = fn @ fn.transpose(1, 2)
    masked = (S < 1.2 * S.mean()) & ~torch.eye(70, dtype=torch.bool)
    peer = _peer((3.0 * S).masked_fill(masked, float("-inf")).unsqueeze(1), v, dtype)
    assert_close_to_truth(out, truth, peer, "masked_affinity_attention")
    assert emu.kernels() == [f"masked_affinity_fwd_kernel<{_name(dtype)}>"]


# an sm_86/sm_89 GPU: 99 KiB of shared memory per block, too little for the large key tiles
RTX = dict(smem=99 * 1024, sms=84)


@pytest.mark.parametrize("gpu", [H100, RTX], ids=["large_tiles", "small_tiles"])
@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
def test_masked_affinity_wide_values_vector_loads_and_tails(emu, dtype, gpu):
    # 13 heads of 64: 832 value columns, two column blocks of 768 (the second mostly past the
    # end); row-major features with C a multiple of the chunk and values [B, n, H, d]: the
    # 16-byte load paths; n = 75: tails in the query and key tiles; two images
    g = torch.Generator().manual_seed(75)
    B, n, C, H, d = 2, 75, 128, 13, 64
    f_buf = torch.full((B * n * C + 64,), float("nan"), dtype=dtype)
    f = f_buf[64:].view(B, n, C)
    f.copy_(torch.cat([_clustered((30, 25, 20), C, dtype, g) for _ in range(B)]))
    v, _ = guarded((B, H, n, d), dtype, float("nan"), "heads_inner", g)
    out, ob = guarded((B, H, n, d), dtype, SENTINEL, "contiguous")
    rnorm, thresh = affinity.first_pass(f, 1.2)
    emu.masked_affinity(f, rnorm, thresh, v, out, 3.0, **gpu)
    small = "_small" if gpu is RTX else ""
    assert emu.kernels() == [f"masked_affinity_fwd_kernel{small}<{_name(dtype)}>"]
    assert untouched_outside(out, ob, SENTINEL)
    fn = torch.nn.functional.normalize(f.float(), dim=-1)
    S = fn @ fn.transpose(1, 2)
    masked = (S < 1.2 * S.mean(dim=(1, 2), keepdim=True)) & ~torch.eye(n, dtype=torch.bool)
    peer = _peer((3.0 * S).masked_fill(masked, float("-inf")).unsqueeze(1), v, dtype)
    assert_close_to_truth(out, masked_affinity_f64(f, v), peer, "masked_affinity_attention")


@pytest.mark.parametrize("gpu", [H100, RTX], ids=["large_tiles", "small_tiles"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
def test_masked_affinity_decides_the_mask_in_float32(emu, dtype, case, gpu):
    # affinities near the threshold (tests/helpers/affinity_cases.py): half-precision products
    # are exact in the float32 accumulators, float32 ones are split into TF32 parts (3 mma)
    f, v, beta, gamma = affinity_case(case, 1, 64, 768, 1, 64, dtype=dtype,
                                      generator=torch.Generator().manual_seed(64))
    out = torch.full_like(v, SENTINEL)
    rnorm, thresh = affinity.first_pass(f, beta)
    emu.masked_affinity(f, rnorm, thresh, v, out, gamma, **gpu)
    error = float(max_relative_error(out, masked_affinity_f64(f, v, beta, gamma)))
    assert error <= 1.5e-2, f"{case}: max relative error {error:.3g}"


@pytest.mark.parametrize("sizes", [(20, 13), (200, 100)], ids=["n33", "n300_split_keys"])
def test_masked_affinity_nan_feature_poisons_its_image(emu, sizes):
    # as the reference: a NaN feature makes mean(S) and every score of its image NaN (also
    # through the combination of key ranges: 2 images of 300 keys leave most of an H100 idle)
    g = torch.Generator().manual_seed(5)
    f = torch.cat([_clustered(sizes, 32, torch.bfloat16, g) for _ in range(2)])
    n = f.shape[1]
    f[1, 7, 3] = float("nan")
    v = torch.randn(2, 1, n, 32, generator=g).to(torch.bfloat16)
    out = torch.full_like(v, SENTINEL)
    rnorm, thresh = affinity.first_pass(f, 1.2)
    emu.masked_affinity(f, rnorm, thresh, v, out, 3.0, **H100)
    want = masked_affinity_f64(f, v).isnan()
    assert want[1].all() and not want[0].any()
    assert torch.equal(out.isnan(), want)


@pytest.mark.parametrize("gpu", [H100, RTX], ids=["large_tiles", "small_tiles"])
@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
def test_masked_affinity_split_keys(emu, dtype, gpu):
    # one image of 520 keys: 17 query tiles fill few SMs, so the keys run in 3 ranges (192, 192
    # and 136 keys: whole 64-key grains) whose rows a second kernel combines
    g = torch.Generator().manual_seed(520)
    f = _clustered((260, 180, 80), 64, dtype, g)
    v, _ = guarded((1, 2, 520, 32), dtype, float("nan"), "heads_inner", g)
    out, ob = guarded((1, 2, 520, 32), dtype, SENTINEL, "every_other")
    rnorm, thresh = affinity.first_pass(f, 1.2)
    emu.masked_affinity(f, rnorm, thresh, v, out, 3.0, **gpu)
    small = "_small" if gpu is RTX else ""
    assert emu.kernels() == [f"masked_affinity_fwd_kernel{small}<{_name(dtype)}>",
                             f"masked_affinity_combine_kernel<{_name(dtype)}>"]
    assert emu.workspace.numel() == 3 * 520 * (768 + 2)
    assert untouched_outside(out, ob, SENTINEL)
    fn = torch.nn.functional.normalize(f.float(), dim=-1)
    S = fn @ fn.transpose(1, 2)
    masked = (S < 1.2 * S.mean()) & ~torch.eye(520, dtype=torch.bool)
    peer = _peer((3.0 * S).masked_fill(masked, float("-inf")).unsqueeze(1), v, dtype)
    assert_close_to_truth(out, masked_affinity_f64(f, v), peer, "masked_affinity_attention")
