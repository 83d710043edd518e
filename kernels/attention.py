"""Flash attention (non-causal) in Triton, after the Triton fused-attention tutorial and FlashAttention-2.

    O = softmax(Q K^T * scale) V,   Q [B, H, N_Q, d],  K, V [B, H, N_K, d]

Forward (`attn_fwd`): one program per (batch * head, query tile). It walks over all key tiles
with an online softmax (running row max `m_i`, running row sum `l_i`, accumulator rescaled by
`alpha` whenever the max grows), so no N_Q x N_K matrix ever exists, and it saves the row
log-sum-exp `lse = log(sum_j exp(s_ij))` beside O.

Backward recomputes P = exp(S - lse) tile by tile from the saved lse:
  `attn_bwd_preprocess`: delta_i = sum_d dO_id O_id  (== rowsum(P * dP));
  `attn_bwd_dkdv`: one program per key tile, over all query tiles:
      dV = P^T dO,  dK = scale * dS^T Q,  dS = P * (dP - delta),  dP = dO V^T;
  `attn_bwd_dq`: one program per query tile, over all key tiles: dQ = scale * dS K.
Each program owns its output tile, so the backward is deterministic (no atomics).

Scores are kept in log2 units (scale * log2(e) folded in) so the softmax uses `exp2`. Any
lengths >= 1 work: keys past N_K score -inf, query rows past N_Q are computed but never stored.
Head dims d <= 128: tiles are BLOCK_D = next power of two >= 16 wide and the tail is masked.
Every tensor comes with its strides (strided views need no copy) and every offset into one is
int64, so no index * stride product wraps around at 2**31; accumulation is float32 (float64 for
float64 inputs). Programs run on the grid (B * H, tiles): B * H on axis 0, whose CUDA limit is
2**31 - 1 programs rather than the 65535 of axes 1 and 2.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import autotune, interpreting

INTERPRET = interpreting()  # the mode the kernels below are built in

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # log(x) == log2(x) * LN2

AUTOTUNE_KEY = ["HEAD_DIM", "N_Q_BUCKET", "N_K_BUCKET", "DOT_PRECISION"]


def _configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


# (BLOCK_M, BLOCK_N, num_warps, num_stages); Hopper-sized tiles, the autotuner drops the ones
# whose shared memory does not fit (e.g. 128 x 128 tiles of d = 128 in float32).
FWD_CONFIGS = _configs([(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 4, 4),
                        (64, 64, 4, 3), (64, 32, 4, 2)])
# dK/dV: BLOCK_N keys per program, BLOCK_M queries per step; dQ: the other way round.
BWD_DKDV_CONFIGS = _configs([(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4),
                             (32, 32, 4, 2)])
BWD_DQ_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                           (32, 32, 4, 2)])
# Under the interpreter: one config, big enough to keep the number of (slow) tile steps low and
# small enough that the tests' short lengths still end in a partial tile.
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
BLOCK_M_PREPROCESS = 64


@autotune(FWD_CONFIGS, AUTOTUNE_KEY, INTERPRET_CONFIG)
@triton.jit
def attn_fwd(
    Q, K, V, O, LSE,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H, N_Q, N_K,
    N_Q_BUCKET, N_K_BUCKET,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    off_bh = tl.program_id(0)
    start_m = tl.program_id(1)
    # int64 offsets throughout: batch, row or column index times a stride may pass 2**31
    # (B*H*N*d elements, or a sequence-major view whose row stride is B*H*d)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    LSE += off_b * stride_lb + off_h * stride_lh

    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM

    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)  # running sum of exp2(s - m_i) v
    for start_n in range(0, N_K, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < N_K
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + offs_kn[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + offs_kn[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every key tile holds at least one real key, so m_new is finite from the first tile on
        # and alpha = exp2(-inf) = 0 wipes the empty initial state.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # l_i >= 1 on every row (the max itself contributes exp2(0)); rows past N_Q saw q = 0,
    # i.e. finite scores, so nothing here is NaN even before the masked store.
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * LN2  # back to natural log for the saved lse
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + offs_m * stride_lm, lse.to(LSE.dtype.element_ty), mask=mask_m)


@triton.jit
def attn_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta [B*H, N_Q] (contiguous) = rowsum(dO * O)."""
    off_bh = tl.program_id(0)
    start_m = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)  # int64 offsets, as in attn_fwd
    off_h = (off_bh % H).to(tl.int64)
    O += off_b * stride_ob + off_h * stride_oh
    DO += off_b * stride_dob + off_h * stride_doh
    DELTA += off_bh.to(tl.int64) * N_Q

    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_m = offs_m < N_Q
    mask = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    tl.store(DELTA + offs_m, delta, mask=mask_m)


@autotune(BWD_DKDV_CONFIGS, AUTOTUNE_KEY, INTERPRET_CONFIG)
@triton.jit
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_K,
    N_Q_BUCKET, N_K_BUCKET,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key tile (BLOCK_N keys), looping over all query tiles (BLOCK_M each)."""
    off_bh = tl.program_id(0)
    start_n = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)  # int64 offsets, as in attn_fwd
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += off_b * stride_lb + off_h * stride_lh
    DELTA += off_bh.to(tl.int64) * N_Q
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh

    offs_n = start_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_d = offs_d < HEAD_DIM
    kv_mask = (offs_n < N_K)[:, None] & mask_d[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_qm = start_m + offs_m
        mask_m = offs_qm < N_Q
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + offs_qm[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=q_mask, other=0.0)
        do = tl.load(DO + offs_qm[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + offs_qm * stride_lm, mask=mask_m, other=0.0).to(ACC_DTYPE) * LOG2E
        delta = tl.load(DELTA + offs_qm, mask=mask_m, other=0.0)
        # Transposed tiles (keys x queries) make dV = P^T dO and dK = dS^T Q plain dots.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        p_t = tl.where(mask_m[None, :], p_t, 0.0)  # queries past N_Q take no part
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@autotune(BWD_DQ_CONFIGS, AUTOTUNE_KEY, INTERPRET_CONFIG)
@triton.jit
def attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_K,
    N_Q_BUCKET, N_K_BUCKET,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query tile (BLOCK_M queries), looping over all key tiles (BLOCK_N each)."""
    off_bh = tl.program_id(0)
    start_m = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)  # int64 offsets, as in attn_fwd
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += off_b * stride_lb + off_h * stride_lh
    DELTA += off_bh.to(tl.int64) * N_Q
    DQ += off_b * stride_dqb + off_h * stride_dqh

    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask,
                 other=0.0)
    lse = tl.load(LSE + offs_m * stride_lm, mask=mask_m, other=0.0).to(ACC_DTYPE) * LOG2E
    delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for start_n in range(0, N_K, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < N_K
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + offs_kn[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + offs_kn[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)  # keys past N_K take no part
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)
