"""The tensor-core CUDA attention without a GPU: its fragment layouts against the PTX ISA, and its
kernels and host code run by the emulator in tests/cuda_emulator against float64 math.

The emulator (emulator.h says how) runs each CUDA thread as a fiber and implements mma.sync,
ldmatrix and cp.async from the PTX ISA's definitions, independently of the layout header
csrc/include/armfast/mma_layout.h that the kernels use. The attention tests run the same host code
as armfast._C_cuda (tile choice, parameters, launch sequence of csrc/cuda/flash_dispatch.h), with
fresh random inputs at awkward sizes, strided views inside NaN-filled buffers and outputs inside
sentinel-filled ones. Needs a C++ compiler and the CUDA headers (cuda_fp16.h), not a GPU.
"""
from __future__ import annotations

import subprocess

import pytest
import torch

from helpers.emulator import (DTYPE_IDS, DTYPES, EMULATOR, H100, KIB, SENTINEL,
                              assert_close_to_truth, build_emulator, compile_cpp, guarded,
                              untouched_outside)
from helpers.tensors import attention_f64


# ---- fragment layouts --------------------------------------------------------------------------
# The PTX ISA's tables (groupID = lane >> 2, threadID_in_group = lane % 4), written out here.

def isa_c(lane, i):
    return (lane >> 2) + (8 if i >= 2 else 0), (lane % 4) * 2 + (i & 1)


def isa_a16(lane, i):
    row = (lane >> 2) + (0 if (i < 2 or 4 <= i < 6) else 8)
    return row, (lane % 4) * 2 + (i & 1) + (8 if i >= 4 else 0)


def isa_b16(lane, i):
    return (lane % 4) * 2 + (i & 1) + (8 if i >= 2 else 0), lane >> 2


def isa_a8_tf32(lane, i):
    return (lane >> 2) + (8 if i in (1, 3) else 0), (lane % 4) + (4 if i >= 2 else 0)


def isa_b8_tf32(lane, i):
    return (lane % 4) + (4 if i == 1 else 0), lane >> 2


def ldmatrix_source(lane, reg, half, address, trans):
    """(row, col) of the tile that ldmatrix.x4 puts in half `half` of register `reg` of `lane`,
    when lane l supplies the address of tile element address(l) = (row, col): lanes 8 r .. 8 r + 7
    address rows 0..7 of matrix r; a lane receives (row lane / 4, cols 2 (lane % 4) + half) of
    matrix `reg`, or with .trans (row 2 (lane % 4) + half, col lane / 4)."""
    if trans:
        row, col = address(8 * reg + 2 * (lane % 4) + half)
        return row, col + lane // 4
    row, col = address(8 * reg + lane // 4)
    return row, col + 2 * (lane % 4) + half


@pytest.fixture(scope="session")
def layout_maps(tmp_path_factory):
    exe = tmp_path_factory.mktemp("layout") / "layout_dump"
    compile_cpp([EMULATOR / "layout_dump.cpp"], exe)
    maps = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        name, *values = line.split()
        values = tuple(map(int, values))
        if name in ("rows16", "cols16"):
            maps[(name, values[0])] = values[1:]
        elif name == "tf32_k":
            maps[(name, values[0])] = values[1]
        else:
            maps[(name, values[0], values[1])] = values[2:]
    return maps


def test_fragment_maps_match_the_ptx_isa(layout_maps):
    for lane in range(32):
        for name, isa, count in (("c", isa_c, 4), ("a16", isa_a16, 8), ("b16", isa_b16, 4),
                                 ("a8", isa_a8_tf32, 4), ("b8", isa_b8_tf32, 2)):
            for i in range(count):
                assert layout_maps[(name, lane, i)] == isa(lane, i), (name, lane, i)


def test_tf32_k_relabelling_is_a_permutation_matching_the_accumulator_columns(layout_maps):
    relabel = [layout_maps[("tf32_k", kk)] for kk in range(8)]
    assert sorted(relabel) == list(range(8))
    for lane in range(32):  # A's k = quad and quad + 4 are the lane's accumulator columns 2 quad, 2 quad + 1
        a_cols = {relabel[isa_a8_tf32(lane, i)[1]] for i in range(4)}
        assert a_cols == {isa_c(lane, i)[1] for i in range(4)}


@pytest.mark.parametrize("operand,pattern,trans", [
    ("A from [m][k]", "rows16", False), ("A from [k][m]", "cols16", True),
    ("B from [n][k]", "cols16", False), ("B from [k][n]", "rows16", True)])
def test_ldmatrix_patterns_build_the_mma_fragments(layout_maps, operand, pattern, trans):
    """Every element each lane receives is the one the m16n8k16 fragment needs there."""
    def address(lane):
        return layout_maps[(pattern, lane)]
    for lane in range(32):
        for reg in range(4):
            for half in range(2):
                row, col = ldmatrix_source(lane, reg, half, address, trans)
                if operand.startswith("A"):
                    want = isa_a16(lane, 2 * reg + half)  # (m, k)
                    got = (row, col) if operand == "A from [m][k]" else (col, row)
                else:  # register reg is b[n tile reg // 2][reg % 2]
                    k, n = isa_b16(lane, 2 * (reg % 2) + half)
                    want = (k, 8 * (reg // 2) + n)
                    got = (col, row) if operand == "B from [n][k]" else (row, col)
                assert got == want, (operand, lane, reg, half)


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    return build_emulator(tmp_path_factory)


def round_to(x, dtype):
    if dtype == torch.float32:  # tf32: 10 mantissa bits, round to nearest (ties away)
        bits = x.float().view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return x.to(dtype).float()


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("a_trans", [False, True], ids=["A_mk", "A_km"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["B_nk", "B_kn"])
@pytest.mark.parametrize("chain", [False, True], ids=["AB", "AB_B2"])
def test_warp_tile_product_equals_matmul(emu, dtype, a_trans, b_trans, chain):
    g = torch.Generator().manual_seed(a_trans * 4 + b_trans * 2 + chain)
    A, B, B2 = (torch.randn(16, 16, generator=g) for _ in range(3))
    got = emu.warp_product(dtype, A, B, B2, a_trans, b_trans, chain)
    want = round_to(A, dtype).double() @ round_to(B, dtype).double()
    if chain:
        want = round_to(want, dtype).double() @ round_to(B2, dtype).double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def attention_peer(q, k, v, scale):
    s = torch.matmul(q, k.transpose(-2, -1)).float() * scale
    return torch.matmul(torch.softmax(s, dim=-1).to(q.dtype), v)


def run_attention(emu, B, H, nq, nk, d, dtype, *, layout="contiguous", out_layout="contiguous", scale=None,
                  deterministic=False, device=H100, reverse=False, backward=True, seed=0):
    """Forward (and backward) through the emulator, checked against float64 and for writes
    outside the outputs."""
    g = torch.Generator().manual_seed(seed)
    scale = d ** -0.5 if scale is None else scale
    (q, qb), (k, kb), (v, vb) = (guarded((B, H, n, d), dtype, float("nan"), layout, g) for n in (nq, nk, nk))
    out, ob = guarded((B, H, nq, d), dtype, SENTINEL, out_layout)
    lse = torch.full((B, H, nq), SENTINEL)
    emu.forward(q, k, v, out, lse, scale, reverse=reverse, **device)
    launches = emu.launches()
    assert untouched_outside(out, ob, SENTINEL), "the forward wrote outside out"
    truth_in = [t.double().requires_grad_() for t in (q, k, v)]
    truth = attention_f64(*truth_in, scale)
    peer_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    peer_dtype = torch.float32 if dtype == torch.float32 else dtype
    peer = attention_peer(*peer_in, scale)
    assert_close_to_truth(out, truth, peer.to(peer_dtype), "out")
    torch.testing.assert_close(lse.double(), torch.logsumexp(truth_in[0] @ truth_in[1].transpose(-2, -1) * scale, -1),
                               atol=1e-2 if dtype == torch.float32 else 2e-2, rtol=1e-3)
    if not backward:
        return launches
    dout, _ = guarded((B, H, nq, d), dtype, float("nan"), layout, g)
    grads = [guarded(t.shape, dtype, SENTINEL, out_layout) for t in (q, k, v)]
    emu.backward(dout, q, k, v, out, lse, *(t for t, _ in grads), scale, deterministic, reverse=reverse, **device)
    launches += emu.launches()
    truth_grads = torch.autograd.grad(truth, truth_in, dout.double())
    peer_grads = torch.autograd.grad(peer, peer_in, dout)
    for name, (got, buf), want, ref in zip(("dq", "dk", "dv"), grads, truth_grads, peer_grads):
        assert untouched_outside(got, buf, SENTINEL), f"the backward wrote outside {name}"
        assert_close_to_truth(got, want, ref, name)
    return launches


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("n,layout", [(1, "contiguous"), (7, "every_other"), (197, "heads_inner"),
                                      (197, "every_other")])
def test_attention_matches_float64(emu, dtype, n, layout):
    run_attention(emu, 1, 2, n, n, 64, dtype, layout=layout, out_layout=layout, seed=n)


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_attention_head_dims_and_cross_lengths(emu, dtype, d, deterministic):
    run_attention(emu, 2, 1, 100, 77, d, dtype, layout="heads_inner", deterministic=deterministic, scale=0.3, seed=d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], **DTYPE_IDS)
@pytest.mark.parametrize("d", [32, 64, 128])
def test_attention_large_and_small_tiles(emu, dtype, d):
    """128-row forward tiles when they fill the GPU; 64-row ones when B*H*tiles < SMs."""
    large = run_attention(emu, 1, 1, 200, 70, d, dtype, device=dict(smem=227 * KIB, sms=1), backward=False)
    small = run_attention(emu, 1, 1, 200, 70, d, dtype, device=dict(smem=227 * KIB, sms=100), backward=False)
    assert (large[0][1], small[0][1]) == (2, 4), (large, small)  # blocks: ceil(200 / 128), ceil(200 / 64)


def test_attention_long_sequence_with_ragged_tiles(emu):
    # 785 = 6 * 128 + 17 = 12 * 64 + 17: partial query and key tiles in every kernel; the output
    # written into a [B, N, H, d] buffer, as the op layer will pass it.
    run_attention(emu, 1, 1, 785, 785, 64, torch.bfloat16, layout="heads_inner", out_layout="heads_inner",
                  device=dict(smem=227 * KIB, sms=1), seed=785)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_attention_in_reverse_thread_order(emu, deterministic):
    """Scheduling the threads the other way round changes who passes each barrier first: a
    missing barrier shows up in one of the two orders."""
    run_attention(emu, 1, 2, 130, 150, 64, torch.float16, deterministic=deterministic, reverse=True,
                  device=dict(smem=227 * KIB, sms=1))


def test_attention_fits_99_kib_of_shared_memory(emu):
    for d in (32, 64, 128):
        launches = run_attention(emu, 1, 1, 40, 40, d, torch.bfloat16, device=dict(smem=99 * KIB, sms=108), seed=d)
        assert all(smem <= 99 * KIB for *_, smem in launches)


def test_attention_too_little_shared_memory_is_a_clear_error(emu):
    with pytest.raises(RuntimeError, match=r"forward kernel for float16 with head dim 128 needs \d+ bytes of shared "
                                           r"memory per block, but cuda:0 allows 40000; use backend='triton'"):
        run_attention(emu, 1, 1, 8, 8, 128, torch.float16, device=dict(smem=40000, sms=1), backward=False)


# ---- the GEMMs of patch_text_logits --------------------------------------------------------------
# (name, staging, M, N, K, splits): the forward x text^T (A [m][k], B [n][k]), the backward's
# y = dout text_hat (A [m][k], B [k][n] with a per-k scale) and z = dout^T x_hat (A [k][m], B [k][n],
# the reduction over all rows split over blocks).
GEMMS = [("x_text", True, True, 70, 37, 96, 1), ("dout_text", True, False, 70, 96, 37, 1),
         ("dout_x", False, False, 37, 96, 1000, 3)]


@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("name,a_mk,b_nk,M,N,K,splits", GEMMS, ids=[g[0] for g in GEMMS])
@pytest.mark.parametrize("contiguous", [True, False], ids=["vec", "strided"])
def test_logits_gemm_on_tensor_cores(emu, dtype, name, a_mk, b_nk, M, N, K, splits, contiguous):
    g = torch.Generator().manual_seed(M + N + K)
    def operand(rows, cols, inner_is_cols):
        """[rows, cols] with the contiguous dim `cols` (inner_is_cols) or `rows`; strided: every other."""
        step = 1 if contiguous else 2
        if inner_is_cols:
            return torch.randn(rows, cols * step, generator=g).to(dtype)[:, ::step]
        return torch.randn(cols, rows * step, generator=g).to(dtype)[:, ::step].t()
    a = operand(M, K, a_mk)
    b = operand(K, N, not b_nk)
    kscale = torch.rand(K, generator=g) + 0.5 if not b_nk else torch.ones(K)
    mscale, nscale, sscale = torch.rand(M, generator=g) + 0.5, torch.rand(N, generator=g) + 0.5, torch.tensor([3.0])
    rows_split = 10 if (a_mk and contiguous) else 0  # A's rows as a [7, 10] grid, as x's b*N + n
    got, vec = emu.logits_gemm(a, b, a_mk, b_nk, kscale, mscale, nscale, sscale, splits, rows_split)
    per = 16 // a.element_size()  # 16-byte loads need the other dim's stride to keep chunks aligned
    want_vec = {"vec_a": contiguous and a.stride(0 if a_mk else 1) % per == 0,
                "vec_b": contiguous and b.stride(1 if b_nk else 0) % per == 0}
    assert vec == {key: str(int(value)) for key, value in want_vec.items()}
    b_scaled = round_to(b.float() * kscale[:, None], dtype) if not b_nk else round_to(b.float(), dtype)
    want = 3.0 * mscale[:, None].double() * nscale[None, :].double() * (round_to(a.float(), dtype).double() @ b_scaled.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
