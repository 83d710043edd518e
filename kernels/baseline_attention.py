"""The attentions of the training-free baselines in Triton, forward only, after kernels/attention.py.

`self_corr_fwd`: one program per (batch * head, query tile) walks over the key tiles of the same
operand X with an online softmax, no N x N matrix:

    ClearCLIP   O = softmax(s X X^T) V
    NACLIP      O = softmax(s X X^T + G) V   (BIAS)
    SCLIP       O = (softmax(s Q Q^T) + softmax(s K K^T)) V   (DUAL: X = Q, X2 = K)

NACLIP's G_ij = exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 sigma^2)) comes from the tokens'
grid positions (row-major patches after FIRST class tokens, G = 0 on those), computed per tile
from the token indices. SCLIP keeps two online-softmax states and two accumulators; each V tile
is loaded once and feeds both.

`masked_affinity_fwd` (ProxyCLIP): one program per (batch * value block, query tile). S is the
cosine of the VFM features F [B, n, C], from their dot products (C in BLOCK_C slices, float32
accumulators: exact products of half inputs) and the inverse row norms of a first pass; entries
S_ij < THRESH (= beta mean(S)) are masked except on the diagonal; softmax(gamma (S - THRESH))
online, applied to the values of every head at once: V is read as [n, H * d] in BLOCK_DV columns,
since one map serves all heads. S is computed once per BLOCK_DV columns (3 to 6 times at
H d = 768): a [BLOCK_M, H d] accumulator in one program would not fit its registers.

Scores are in log2 units (scale * log2(e) folded in) so the softmax uses `exp2`; the row max
is guarded so that a row whose keys are all masked so far stays at zero weight, not NaN. Any
lengths >= 1, head dims <= 128 (BLOCK_D, masked tail); int64 offsets; float32 accumulation
(float64 for float64 inputs).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting
from .attention import _log2e

INTERPRET = interpreting()

# (BLOCK_M, BLOCK_N, num_warps, num_stages), measured once per size bucket by the Tuner of
# armfast/ops/_backends/triton/baselines.py; SCLIP holds two accumulators, so a config that runs
# out of registers or shared memory is dropped there.
_SELF_CORR = [(128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 2)]
# (BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_DV, num_warps, num_stages)
_AFFINITY = [(64, 64, 64, 128, 4, 3), (128, 64, 64, 128, 8, 3), (64, 64, 64, 256, 8, 2),
             (128, 64, 32, 256, 8, 2), (64, 32, 64, 64, 4, 2)]
INTERPRET_SELF_CORR = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
INTERPRET_AFFINITY = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_C": 32, "BLOCK_DV": 64})


def self_corr_configs(family: str, kind: str) -> list[triton.Config]:
    """Launch configs of `self_corr_fwd` for a GPU family; plain float32 gets small tiles."""
    tiles = _SELF_CORR if kind != "fp32" and family != "small" else _SELF_CORR[2:]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


def affinity_configs(family: str, kind: str) -> list[triton.Config]:
    """Launch configs of `masked_affinity_fwd` for a GPU family."""
    tiles = _AFFINITY if kind != "fp32" and family != "small" else _AFFINITY[-1:]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_C": c, "BLOCK_DV": dv},
                          num_warps=w, num_stages=s) for m, n, c, dv, w, s in tiles]


@triton.jit
def _online_softmax_step(s, m_i, l_i, acc, v, DOT_PRECISION: tl.constexpr):
    """One key tile of scores s (log2 units, -inf = masked) into the running (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: p = alpha = 0
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _grid_position(t, GRID_W, FIRST):
    """(row, column, is a patch) of token indices t: row-major patches after FIRST class tokens."""
    p = t - FIRST
    patch = p >= 0
    p = tl.where(patch, p, 0)
    return (p // GRID_W).to(tl.float32), (p % GRID_W).to(tl.float32), patch


@triton.jit
def self_corr_fwd(
    X, X2, V, O,
    sm_scale, bias_coef,  # bias_coef = -log2(e) / (2 sigma^2): G = exp2(bias_coef * dist^2)
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_yb, stride_yh, stride_yn, stride_yd,  # X2 (SCLIP's K)
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, GRID_W, FIRST,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DUAL: tl.constexpr, BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    off_bh = tl.program_id(0)
    start_m = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    X += off_b * stride_xb + off_h * stride_xh
    X2 += off_b * stride_yb + off_h * stride_yh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh

    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]
    qk_scale = sm_scale * _log2e()

    q = tl.load(X + offs_m[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    if DUAL:
        q2 = tl.load(X2 + offs_m[:, None] * stride_yn + offs_d[None, :] * stride_yd, mask=q_mask,
                     other=0.0)
        m2 = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
        l2 = tl.zeros([BLOCK_M], ACC_DTYPE)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    if BIAS:
        row_m, col_m, patch_m = _grid_position(offs_m, GRID_W, FIRST)

    for start_n in range(0, N, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(X + offs_kn[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=kv_mask,
                    other=0.0)
        v = tl.load(V + offs_kn[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if BIAS:
            row_n, col_n, patch_n = _grid_position(offs_kn, GRID_W, FIRST)
            dr = row_m[:, None] - row_n[None, :]
            dc = col_m[:, None] - col_n[None, :]
            g = tl.math.exp2(bias_coef * (dr * dr + dc * dc))
            s += tl.where(patch_m[:, None] & patch_n[None, :], g * _log2e(), 0.0)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, v, DOT_PRECISION)
        if DUAL:
            k2 = tl.load(X2 + offs_kn[:, None] * stride_yn + offs_d[None, :] * stride_yd,
                         mask=kv_mask, other=0.0)
            s2 = tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION) * qk_scale
            s2 = tl.where(mask_n[None, :], s2, float("-inf"))
            m2, l2, acc2 = _online_softmax_step(s2, m2, l2, acc2, v, DOT_PRECISION)

    # every row saw real keys, so l_i >= 1; rows past N are computed but not stored
    out = acc / l_i[:, None]
    if DUAL:
        out += acc2 / l2[:, None]
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def masked_affinity_fwd(
    F, RNORM, THRESH, V, O,
    gamma,
    stride_fb, stride_fn, stride_fc,
    stride_rb, stride_rn,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    N, C, H,
    HEAD_DIM: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    DV = H * HEAD_DIM
    value_blocks = tl.cdiv(DV, BLOCK_DV)
    pid = tl.program_id(0)
    start_m = tl.program_id(1)
    off_b = (pid // value_blocks).to(tl.int64)
    start_dv = (pid % value_blocks).to(tl.int64) * BLOCK_DV
    F += off_b * stride_fb
    RNORM += off_b * stride_rb
    V += off_b * stride_vb
    O += off_b * stride_ob

    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    offs_dv = start_dv + tl.arange(0, BLOCK_DV).to(tl.int64)  # columns of V as [n, H * d]
    head, col = offs_dv // HEAD_DIM, offs_dv % HEAD_DIM
    mask_m = offs_m < N
    mask_dv = offs_dv < DV
    v_cols = head * stride_vh + col * stride_vd

    r_m = tl.load(RNORM + offs_m * stride_rn, mask=mask_m, other=0.0).to(ACC_DTYPE)
    thresh = tl.load(THRESH + off_b).to(ACC_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)
    for start_n in range(0, N, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < N
        dots = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)
        for start_c in range(0, C, BLOCK_C):
            cs = start_c + offs_c
            mask_c = cs < C
            fq = tl.load(F + offs_m[:, None] * stride_fn + cs[None, :] * stride_fc,
                         mask=mask_m[:, None] & mask_c[None, :], other=0.0)
            fk = tl.load(F + offs_kn[:, None] * stride_fn + cs[None, :] * stride_fc,
                         mask=mask_n[:, None] & mask_c[None, :], other=0.0)
            dots = tl.dot(fq, tl.trans(fk), dots, input_precision=DOT_PRECISION)
        r_n = tl.load(RNORM + offs_kn * stride_rn, mask=mask_n, other=0.0).to(ACC_DTYPE)
        cos = dots * r_m[:, None] * r_n[None, :]
        # gamma (S - beta mean(S)) as the reference writes it (softmax(gamma S), shifted), masked
        # below 0 off the diagonal: a NaN threshold (a NaN feature) leaves every score NaN, as there
        masked = (cos < thresh) & (offs_m[:, None] != offs_kn[None, :])
        s = tl.where(~masked & mask_n[None, :], (cos - thresh) * (gamma * _log2e()), float("-inf"))
        v = tl.load(V + offs_kn[:, None] * stride_vn + v_cols[None, :],
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, v, DOT_PRECISION)

    # the diagonal is never masked: l_i >= 1 on every row (rows past N see only masked keys
    # and are not stored)
    out = acc / tl.where(mask_m, l_i, 1.0)[:, None]
    o_cols = head * stride_oh + col * stride_od
    tl.store(O + offs_m[:, None] * stride_on + o_cols[None, :], out.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_dv[None, :])
