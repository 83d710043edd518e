"""SC-CLIP's similarity patterns in Triton, forward only, after kernels/baseline_attention.py. Both
start from the cosine similarities S_ij = <f_i, f_j> r_i r_j of the features F [B, N, C]
(r_i = 1 / max(|f_i|, eps), from an O(N C) first pass), computed tile by tile from the dot
products of F (C in BLOCK_C slices): no N x N matrix exists.

`similarity_aggregation_fwd`: out = W X / (rowsum(W) + 1e-6) with W = S [S >= threshold]. No
softmax: each key tile adds W_tile X_tile to the accumulator and W_tile's row sums to `w_sum`,
saved as ROWSUM [B, N]. X [B, N, D] is read in BLOCK_DV columns: one program per
(batch * value block, query tile), so S is recomputed once per BLOCK_DV columns of X.

`averaged_dual_softmax_fwd`: out = ((P_mask + P_kk) / 2) V per head, with
    P_mask = softmax(A),  A = gamma (S - beta mean S), A_ij < 0 masked off the diagonal
    P_kk   = softmax(scale K K^T)
One program per (batch * head, query tile) runs both online softmaxes over the same key tiles:
two running (max, sum) pairs and two accumulators, each V tile loaded once for both. The
program's saved statistics are the two row log-sum-exps LSE_MASK and LSE_KK [B, H, N]
(natural log). S is recomputed per head: the k-k softmax and its accumulator stay in registers
that way; the cost is H * 2 N^2 C for S beside 6 N^2 d per head for the rest.

Discrete decisions are made in float32 (float64 for float64 inputs) whatever the input dtype:
half-precision products of F are exact in the float32 accumulator, and float32 features are
multiplied in IEEE float32, or 3xTF32 when torch allows TF32 (`S_PRECISION`), never plain TF32,
whose 10-bit mantissa would move S by ~1e-3 and flip entries near the threshold.

Scores are in log2 units so the softmax uses `exp2`. Any lengths >= 1, head dims <= 128;
int64 offsets; float32 accumulation (float64 for float64 inputs).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting
from .attention import _ln2, _log2e
from .baseline_attention import _online_softmax_step

INTERPRET = interpreting()

# (BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_DV, num_warps, num_stages)
_AGGREGATION = [(64, 64, 64, 128, 4, 3), (128, 64, 64, 128, 8, 3), (64, 64, 32, 256, 8, 2),
                (64, 32, 64, 64, 4, 2)]
_AGGREGATION_TF32 = [(64, 64, 32, 256, 8, 2), (64, 32, 32, 128, 8, 2)]  # float32 tiles are twice the size
# (BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages): two accumulators of BLOCK_D columns; "wide"
# (d = 128, or float32 on TF32) keeps fewer rows per warp so that both stay in registers
_DUAL = [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 32, 64, 4, 2), (32, 32, 32, 4, 2)]
_DUAL_WIDE = [(64, 32, 32, 8, 2), (128, 32, 32, 8, 2), (32, 32, 32, 4, 2)]
INTERPRET_AGGREGATION = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_C": 32, "BLOCK_DV": 64})
INTERPRET_DUAL = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_C": 32})


def aggregation_configs(family: str, kind: str) -> list[triton.Config]:
    """Launch configs of `similarity_aggregation_fwd` for a GPU family."""
    if kind == "fp32" or family == "small":
        tiles = _AGGREGATION[-1:]
    else:
        tiles = _AGGREGATION_TF32 if kind == "tf32" else _AGGREGATION
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_C": c, "BLOCK_DV": dv},
                          num_warps=w, num_stages=s) for m, n, c, dv, w, s in tiles]


def dual_configs(family: str, kind: str, block_d: int) -> list[triton.Config]:
    """Launch configs of `averaged_dual_softmax_fwd` for a GPU family."""
    if kind == "fp32" or family == "small":
        tiles = _DUAL[-1:]
    else:
        tiles = _DUAL_WIDE if block_d > 64 or kind == "tf32" else _DUAL
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_C": c}, num_warps=w, num_stages=s)
            for m, n, c, w, s in tiles]


@triton.jit
def _row_eps():
    return 1e-6  # added to the row sums of W before dividing, as SC-CLIP does


@triton.jit
def _cosine_tile(F, RNORM, offs_m, offs_kn, mask_m, mask_n, r_m, stride_fn, stride_fc,
                 stride_rn, C, ACC_DTYPE: tl.constexpr, S_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """S [BLOCK_M, BLOCK_N] of query rows offs_m and key rows offs_kn: F_m F_n^T (C in BLOCK_C
    slices) times the inverse row norms; zero past N."""
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    dots = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)
    for start_c in range(0, C, BLOCK_C):
        cs = start_c + offs_c
        mask_c = cs < C
        fq = tl.load(F + offs_m[:, None] * stride_fn + cs[None, :] * stride_fc,
                     mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        fk = tl.load(F + offs_kn[:, None] * stride_fn + cs[None, :] * stride_fc,
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        dots = tl.dot(fq, tl.trans(fk), dots, input_precision=S_PRECISION)
    r_n = tl.load(RNORM + offs_kn * stride_rn, mask=mask_n, other=0.0).to(ACC_DTYPE)
    return dots * r_m[:, None] * r_n[None, :]


@triton.jit
def similarity_aggregation_fwd(
    F, RNORM, X, O, ROWSUM,
    threshold,
    stride_fb, stride_fn, stride_fc,
    stride_rb, stride_rn,
    stride_xb, stride_xn, stride_xd,
    stride_ob, stride_on, stride_od,
    N, C, D,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, S_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    value_blocks = tl.cdiv(D, BLOCK_DV)
    pid = tl.program_id(0)
    start_m = tl.program_id(1)
    off_b = (pid // value_blocks).to(tl.int64)
    value_block = pid % value_blocks
    F += off_b * stride_fb
    RNORM += off_b * stride_rb
    X += off_b * stride_xb
    O += off_b * stride_ob

    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_dv = value_block.to(tl.int64) * BLOCK_DV + tl.arange(0, BLOCK_DV).to(tl.int64)
    mask_m = offs_m < N
    mask_dv = offs_dv < D

    r_m = tl.load(RNORM + offs_m * stride_rn, mask=mask_m, other=0.0).to(ACC_DTYPE)
    w_sum = tl.zeros([BLOCK_M], ACC_DTYPE)  # the saved statistic: rowsum(W)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)
    for start_n in range(0, N, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < N
        cos = _cosine_tile(F, RNORM, offs_m, offs_kn, mask_m, mask_n, r_m, stride_fn, stride_fc,
                           stride_rn, C, ACC_DTYPE, S_PRECISION, BLOCK_M, BLOCK_N, BLOCK_C)
        w = tl.where(cos >= threshold, cos, 0.0)  # keys past N have cos = 0: w = 0 there
        x = tl.load(X + offs_kn[:, None] * stride_xn + offs_dv[None, :] * stride_xd,
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        w_sum += tl.sum(w, 1)
        acc = tl.dot(w.to(x.dtype), x, acc, input_precision=DOT_PRECISION)

    out = acc / (w_sum + _row_eps())[:, None]
    tl.store(O + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])
    if value_block == 0:
        tl.store(ROWSUM + off_b * N + offs_m, w_sum, mask=mask_m)


@triton.jit
def averaged_dual_softmax_fwd(
    F, RNORM, THRESH, K, V, O, LSE_MASK, LSE_KK,
    sm_scale, gamma,
    stride_fb, stride_fn, stride_fc,
    stride_rb, stride_rn,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, C,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, S_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    off_bh = tl.program_id(0)
    start_m = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    F += off_b * stride_fb
    RNORM += off_b * stride_rb
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh

    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]
    kk_scale = sm_scale * _log2e()
    a_scale = gamma * _log2e()

    r_m = tl.load(RNORM + offs_m * stride_rn, mask=mask_m, other=0.0).to(ACC_DTYPE)
    thresh = tl.load(THRESH + off_b).to(ACC_DTYPE)  # beta mean(S) of this image
    kq = tl.load(K + offs_m[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=q_mask,
                 other=0.0)  # the query rows of K
    # running (max, sum) in log2 units and the accumulator of each softmax
    m_mask = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_mask = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc_mask = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    m_kk = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_kk = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc_kk = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for start_n in range(0, N, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        cos = _cosine_tile(F, RNORM, offs_m, offs_kn, mask_m, mask_n, r_m, stride_fn, stride_fc,
                           stride_rn, C, ACC_DTYPE, S_PRECISION, BLOCK_M, BLOCK_N, BLOCK_C)
        a = gamma * (cos - thresh)  # the decision a >= 0 in ACC_DTYPE
        keep = ((a >= 0) | (offs_m[:, None] == offs_kn[None, :])) & mask_n[None, :]
        s_mask = tl.where(keep, (cos - thresh) * a_scale, float("-inf"))
        k = tl.load(K + offs_kn[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask,
                    other=0.0)
        s_kk = tl.dot(kq, tl.trans(k), input_precision=DOT_PRECISION) * kk_scale
        s_kk = tl.where(mask_n[None, :], s_kk, float("-inf"))
        v = tl.load(V + offs_kn[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask,
                    other=0.0)  # one load of the V tile feeds both softmaxes
        m_mask, l_mask, acc_mask = _online_softmax_step(s_mask, m_mask, l_mask, acc_mask, v,
                                                        DOT_PRECISION)
        m_kk, l_kk, acc_kk = _online_softmax_step(s_kk, m_kk, l_kk, acc_kk, v, DOT_PRECISION)

    # the diagonal is never masked and every row saw real keys, so both sums are >= 1 on rows
    # below N (rows past N are not stored)
    l_mask = tl.where(mask_m, l_mask, 1.0)
    l_kk = tl.where(mask_m, l_kk, 1.0)
    out = 0.5 * (acc_mask / l_mask[:, None] + acc_kk / l_kk[:, None])
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=q_mask)
    rows = off_bh.to(tl.int64) * N + offs_m
    tl.store(LSE_MASK + rows, (m_mask + tl.math.log2(l_mask)) * _ln2(), mask=mask_m)
    tl.store(LSE_KK + rows, (m_kk + tl.math.log2(l_kk)) * _ln2(), mask=mask_m)
