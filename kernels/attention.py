"""Flash attention (non-causal) in Triton, after the Triton fused-attention tutorial and
FlashAttention-2.

    O = softmax(Q K^T * scale) V,   Q [B, H, N_Q, d],  K, V [B, H, N_K, d]

Forward (`attn_fwd`): one program per (batch * head, query tile). It walks over the key tiles
with an online softmax (running row max `m_i`, running row sum `l_i`, accumulator rescaled by
`alpha` whenever the max grows), so no N_Q x N_K matrix ever exists, and it saves the row
log-sum-exp `lse = log(sum_j exp(s_ij))` beside O. `attn_fwd_tma` is the same with Hopper's
TMA tensor descriptors instead of pointer tiles; the tuner measures it beside `attn_fwd` where
the tensors allow descriptors.

Backward (FlashAttention-2), recomputing P = exp(S - lse) tile by tile from the saved lse:
  `attn_bwd_preprocess`: delta_i = sum_d dO_id O_id (== rowsum(P * dP)); also clears the float32
      dQ accumulator, so the atomic path needs no separate memset;
  `attn_bwd`: one program per key tile, over all query tiles, 5 matrix products per step:
      S^T = K Q^T,  dV += P^T dO,  dP^T = V dO^T,  dS = P * (dP - delta),  dK += dS^T Q,
      and dQ += dS K added atomically into the float32 accumulator (DQ_ATOMIC);
  `attn_bwd_dq`: the deterministic alternative to those atomics (float addition in whatever
      order programs finish is not reproducible bit for bit): `attn_bwd` without DQ_ATOMIC,
      then one program per query tile owns its dQ rows and loops over the key tiles.

Scores stay in log2 units with scale * log2(e) folded into one multiply per score, so the softmax
uses `exp2`. Any lengths >= 1 work: every loop runs over the full tiles without masks and ends in
one masked tail tile, where keys past N_K score -inf and query rows past N_Q are zero-filled and
never stored. Head dims d <= 128 are padded to BLOCK_D = next power of two >= 16; the d mask
exists only when d < BLOCK_D (constexpr). Q, K, V, O, dO, dK, dV come with their strides (strided
views need no copy); LSE and DELTA are [B*H, N_Q] contiguous (their strides would change with
N_Q and, being specialised, recompile). Every offset is int64, so no index * stride product
wraps around at 2**31.

Grids are flat (axis 0 only, 2**31 - 1 programs, where axes 1 and 2 stop at 65535), decoded in
the kernel as (batch * head, tile) with the tiles of one head adjacent: the programs that run at
the same time share K and V (forward) or Q and dO (backward), which then stay in L2. Lengths and
H are not specialised (`do_not_specialize`): a new length never recompiles.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting

INTERPRET = interpreting()  # the mode the kernels below are built in


# Constants as inlined functions, not tl.constexpr globals: Triton re-checks every global a
# kernel reads on each launch (microseconds of host time per call).
@triton.jit
def _log2e():
    return 1.4426950408889634  # exp(x) == exp2(x * log2(e))


@triton.jit
def _ln2():
    return 0.6931471805599453  # log(x) == log2(x) * ln(2)


LENGTHS = ["H", "N_Q", "N_K"]  # runtime values, never compile-time specialisations


def _configs(tiles, **extra):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **extra}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


# Under the interpreter: one config, big enough to keep the number of (slow) tile steps low and
# small enough that the tests' short lengths still end in a partial tile.
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
BLOCK_M_PREPROCESS = 64


# Config lists, (BLOCK_M, BLOCK_N, num_warps, num_stages), first = the default when nothing is
# measured. Each list is short because every entry is one more compile on a cold first call.
# tests/triton/test_triton_compile.py checks that the sm90 half-precision ones emit wgmma and
# spill nothing (tools/compile_for_gpu.py prints the facts for any target). "wide" rows
# (d = 128, or TF32 float32) need twice the registers and shared memory. "fp32" (float32
# without TF32) has no tensor-core path; Triton's FMA dot holds whole operand rows per thread,
# so its tiles are small and its kernels still spill a little: a float32 check path, not a
# fast one.
def fwd_configs(family: str, kind: str, block_d: int) -> list[triton.Config]:
    if kind == "fp32":
        return _configs([(32, 32, 8, 2), (16, 32, 4, 2)])
    wide = block_d > 64 or kind == "tf32"
    if family == "sm90":
        if wide:  # a 128 x 128 float32 accumulator needs 8 warps to stay in registers
            return _configs([(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)])
        return _configs([(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)])
    if family == "sm80":
        if wide:
            return _configs([(128, 32, 8, 2), (128, 64, 8, 2)])
        return _configs([(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3)])
    if wide:
        return _configs([(64, 32, 8, 2), (128, 32, 8, 2)])
    return _configs([(64, 64, 4, 2), (64, 32, 4, 2)])


# attn_fwd_tma, offered beside fwd_configs on sm90 when the tensors allow TMA descriptors
def fwd_tma_configs(family: str, kind: str, block_d: int) -> list[triton.Config]:
    if family != "sm90" or kind == "fp32":
        return []
    if block_d > 64 or kind == "tf32":
        return _configs([(128, 64, 8, 3)], VARIANT="tma")
    return _configs([(128, 64, 4, 3), (128, 128, 8, 3)], VARIANT="tma")


# (BLOCK_M queries per step, BLOCK_N keys per program, num_warps, num_stages). On sm90 BLOCK_M
# stays >= 64: the dQ product (BLOCK_M rows) only gets wgmma from 64 rows on.
def bwd_configs(family: str, kind: str, block_d: int) -> list[triton.Config]:
    if kind == "fp32":
        return _configs([(32, 32, 8, 2), (16, 32, 4, 2)])
    wide = block_d > 64 or kind == "tf32"
    if family == "sm90":
        if wide:
            return _configs([(64, 64, 8, 3), (32, 64, 8, 2)])
        return _configs([(64, 128, 8, 2), (64, 64, 4, 3), (64, 128, 8, 3)])
    if family == "sm80":  # mma.sync keeps operands in registers: small tiles, 8 warps
        if wide:
            return _configs([(64, 32, 8, 2), (32, 32, 4, 2)])
        return _configs([(32, 64, 8, 2), (64, 64, 8, 2)])
    return _configs([(32, 32, 4, 2), (32, 64, 8, 2)])


# deterministic dQ: BLOCK_M queries per program, BLOCK_N keys per step
def bwd_dq_configs(family: str, kind: str, block_d: int) -> list[triton.Config]:
    if kind == "fp32":
        return _configs([(32, 32, 8, 2)])
    wide = block_d > 64 or kind == "tf32"
    if family == "sm90":
        return _configs([(128, 64, 8, 2), (64, 64, 4, 3)])
    if wide:
        return _configs([(64, 32, 8, 2)])
    return _configs([(64, 64, 4, 2), (64, 32, 4, 2)])


@triton.jit
def _tile_ptrs(base, rows, offs_d, stride_row, stride_d):
    """Pointers to the [rows, d] tile of a [N, d] matrix (int64 `rows` and `offs_d`)."""
    return base + rows[:, None] * stride_row + offs_d[None, :] * stride_d


@triton.jit
def _tile_mask(rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Which elements of a [rows, BLOCK_D] tile exist: rows < n_rows, and d < HEAD_DIM only where
    the head dim is padded (a mask constant along d keeps the loads vectorised)."""
    mask = (rows < n_rows)[:, None]
    if HEAD_DIM != BLOCK_D:
        mask = mask & (offs_d < HEAD_DIM)[None, :]
    return mask


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile, zero past `n_rows` (if MASK_ROWS) and past HEAD_DIM."""
    if MASK_ROWS:
        tile = tl.load(ptrs, mask=_tile_mask(rows, n_rows, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    elif HEAD_DIM == BLOCK_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _head_and_tile(N, BLOCK: tl.constexpr):
    """(batch * head, tile) of this program on a flat grid: the tiles of one head adjacent."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(N, BLOCK)
    return pid // tiles, pid % tiles


@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, keys, N_K, qk_scale, DOT_PRECISION: tl.constexpr,
                  MASK_KEYS: tl.constexpr):
    """One key tile of the online softmax; scores are raw q.k, scaled inside the exp2."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASK_KEYS:
        s = tl.where((keys < N_K)[None, :], s, float("-inf"))
    # Every tile holds at least one real key, so m_new is finite from the first tile on and
    # alpha = exp2(-inf) = 0 wipes the empty initial state.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION,
                 out_dtype=acc.dtype)
    return acc, l_i, m_new


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, keys, N_K, offs_d, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
              MASK_KEYS: tl.constexpr):
    k = _load_tile(k_ptrs, keys, N_K, offs_d, HEAD_DIM, BLOCK_D, MASK_KEYS)
    v = _load_tile(v_ptrs, keys, N_K, offs_d, HEAD_DIM, BLOCK_D, MASK_KEYS)
    return _softmax_step(acc, l_i, m_i, q, k, v, keys, N_K, qk_scale, DOT_PRECISION, MASK_KEYS)


@triton.jit(do_not_specialize=LENGTHS)
def attn_fwd(
    Q, K, V, O, LSE,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    off_bh, start_m = _head_and_tile(N_Q, BLOCK_M)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    LSE += off_bh.to(tl.int64) * N_Q

    rows = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    q = _load_tile(_tile_ptrs(Q, rows, offs_d, stride_qm, stride_qd), rows, N_Q, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    k_ptrs = _tile_ptrs(K, keys, offs_d, stride_kn, stride_kd)
    v_ptrs = _tile_ptrs(V, keys, offs_d, stride_vn, stride_vd)
    k_step = BLOCK_N * stride_kn.to(tl.int64)
    v_step = BLOCK_N * stride_vn.to(tl.int64)
    qk_scale = sm_scale * _log2e()

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)  # running sum of exp2(s - m_i) v
    full_end = (N_K // BLOCK_N) * BLOCK_N
    for _ in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, keys, N_K, offs_d, qk_scale,
                                  HEAD_DIM, BLOCK_D, DOT_PRECISION, False)
        k_ptrs += k_step
        v_ptrs += v_step
    if full_end < N_K:
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, keys + full_end, N_K, offs_d,
                                  qk_scale, HEAD_DIM, BLOCK_D, DOT_PRECISION, True)

    # l_i >= 1 on every row (the max itself contributes exp2(0)); rows past N_Q saw q = 0,
    # i.e. finite scores, so nothing here is NaN even before the masked store.
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * _ln2()  # back to natural log for the saved lse
    tl.store(_tile_ptrs(O, rows, offs_d, stride_om, stride_od), acc.to(O.dtype.element_ty),
             mask=_tile_mask(rows, N_Q, offs_d, HEAD_DIM, BLOCK_D))
    tl.store(LSE + rows, lse.to(LSE.dtype.element_ty), mask=rows < N_Q)


@triton.jit
def _tma_tile(desc, b, h, row, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A [BLOCK, HEAD_DIM] tile of head (b, h) from a [B, H, N, d] tensor descriptor; rows past N
    come back zero (the TMA unit clips them)."""
    return desc.load([b, h, row, 0]).reshape(BLOCK, HEAD_DIM)


@triton.jit(do_not_specialize=LENGTHS)
def attn_fwd_tma(
    Q, K, V, O, LSE,
    sm_scale,
    H, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_D == HEAD_DIM here
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """`attn_fwd` with Q, K, V, O as [B, H, N, d] TMA tensor descriptors (Hopper's tensor memory
    accelerator: one instruction per tile, no per-element addresses, bounds handled in
    hardware, so the row masks go too). Needs d == BLOCK_D, a contiguous last dimension and
    16-byte aligned strides; the wrapper checks and otherwise launches `attn_fwd`."""
    off_bh, start_m = _head_and_tile(N_Q, BLOCK_M)
    b = off_bh // H
    h = off_bh % H
    q = _tma_tile(Q, b, h, start_m * BLOCK_M, BLOCK_M, HEAD_DIM)
    qk_scale = sm_scale * _log2e()
    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], ACC_DTYPE)
    keys = tl.arange(0, BLOCK_N)
    full_end = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        k = _tma_tile(K, b, h, start_n, BLOCK_N, HEAD_DIM)
        v = _tma_tile(V, b, h, start_n, BLOCK_N, HEAD_DIM)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, keys, N_K, qk_scale, DOT_PRECISION,
                                      False)
    if full_end < N_K:  # keys past N_K load as zeros; the step masks their scores
        k = _tma_tile(K, b, h, full_end, BLOCK_N, HEAD_DIM)
        v = _tma_tile(V, b, h, full_end, BLOCK_N, HEAD_DIM)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, keys + full_end, N_K, qk_scale,
                                      DOT_PRECISION, True)
    acc = acc / l_i[:, None]
    O.store([b, h, start_m * BLOCK_M, 0],
            acc.to(O.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))  # rows past N_Q: clipped
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lse = (m_i + tl.math.log2(l_i)) * _ln2()
    tl.store(LSE + off_bh.to(tl.int64) * N_Q + rows, lse.to(LSE.dtype.element_ty),
             mask=rows < N_Q)


@triton.jit(do_not_specialize=LENGTHS)
def attn_bwd_preprocess(
    O, DO, DELTA, DQ_ACC,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The atomic path's first launch: delta [B*H, N_Q] (contiguous) = rowsum(dO * O) and
    DQ_ACC [B*H, N_Q, d] (contiguous) = 0, the accumulator `attn_bwd` adds dQ into."""
    off_bh, start_m = _head_and_tile(N_Q, BLOCK_M)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    O += off_b * stride_ob + off_h * stride_oh
    DO += off_b * stride_dob + off_h * stride_doh

    rows = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    o = _load_tile(_tile_ptrs(O, rows, offs_d, stride_om, stride_od), rows, N_Q, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_tile(_tile_ptrs(DO, rows, offs_d, stride_dom, stride_dod), rows, N_Q, offs_d,
                    HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * N_Q + rows, delta, mask=rows < N_Q)
    DQ_ACC += off_bh.to(tl.int64) * N_Q * HEAD_DIM
    tl.store(_tile_ptrs(DQ_ACC, rows, offs_d, HEAD_DIM, 1),
             tl.zeros([BLOCK_M, BLOCK_D], DQ_ACC.dtype.element_ty),
             mask=_tile_mask(rows, N_Q, offs_d, HEAD_DIM, BLOCK_D))


@triton.jit
def _bwd_step(dk, dv, k, v, key_ok, Q, DO, LSE, DELTA, DQ_ACC, rows, offs_d, N_Q, sm_scale,
              qk_scale,
              stride_qm, stride_qd, stride_dom, stride_dod,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
              DQ_ATOMIC: tl.constexpr, MASK_ROWS: tl.constexpr):
    """One query tile against this program's key tile: dK, dV accumulate, dQ is added out.

    Query rows past N_Q load q = dO = 0 (and lse = delta = 0): their P^T columns are finite and
    meet only zero rows of dO and Q, so they add nothing. Keys past N_K load k = v = 0, so their
    P^T = exp2(-lse) would be finite only while lse is not very negative: `key_ok` zeroes them
    (one select per score; unlike the query tail, every step of a partial key tile needs it)."""
    q = _load_tile(_tile_ptrs(Q, rows, offs_d, stride_qm, stride_qd), rows, N_Q, offs_d,
                   HEAD_DIM, BLOCK_D, MASK_ROWS)
    do = _load_tile(_tile_ptrs(DO, rows, offs_d, stride_dom, stride_dod), rows, N_Q, offs_d,
                    HEAD_DIM, BLOCK_D, MASK_ROWS)
    if MASK_ROWS:
        lse = tl.load(LSE + rows, mask=rows < N_Q, other=0.0)
        delta = tl.load(DELTA + rows, mask=rows < N_Q, other=0.0)
    else:
        lse = tl.load(LSE + rows)
        delta = tl.load(DELTA + rows)
    # Transposed tiles (keys x queries) make dV = P^T dO and dK = dS^T Q plain dots.
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    p_t = tl.math.exp2(s_t * qk_scale - (lse * _log2e())[None, :])
    p_t = tl.where(key_ok[:, None], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION, out_dtype=dv.dtype)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION, out_dtype=dk.dtype)
    if DQ_ATOMIC:
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * sm_scale
        dq_ptrs = _tile_ptrs(DQ_ACC, rows, offs_d, HEAD_DIM, 1)
        if MASK_ROWS or HEAD_DIM != BLOCK_D:
            tl.atomic_add(dq_ptrs, dq, mask=_tile_mask(rows, N_Q, offs_d, HEAD_DIM, BLOCK_D),
                          sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=LENGTHS)
def attn_bwd(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key tile (BLOCK_N keys), looping over all query tiles (BLOCK_M each); with
    DQ_ATOMIC also dQ, added into DQ_ACC ([B*H, N_Q, d] contiguous, zeroed, float32). DK and DV
    are fresh [B*H, N_K, d] contiguous tensors: no strides to pass (fewer arguments, less host
    time per launch)."""
    off_bh, start_n = _head_and_tile(N_K, BLOCK_N)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += off_bh.to(tl.int64) * N_Q
    DELTA += off_bh.to(tl.int64) * N_Q
    DQ_ACC += off_bh.to(tl.int64) * N_Q * HEAD_DIM
    DK += off_bh.to(tl.int64) * N_K * HEAD_DIM
    DV += off_bh.to(tl.int64) * N_K * HEAD_DIM

    keys = start_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    k = _load_tile(_tile_ptrs(K, keys, offs_d, stride_kn, stride_kd), keys, N_K, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    v = _load_tile(_tile_ptrs(V, keys, offs_d, stride_vn, stride_vd), keys, N_K, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    key_ok = keys < N_K
    qk_scale = sm_scale * _log2e()

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    full_end = (N_Q // BLOCK_M) * BLOCK_M
    for start_m in range(0, full_end, BLOCK_M):
        dk, dv = _bwd_step(dk, dv, k, v, key_ok, Q, DO, LSE, DELTA, DQ_ACC, rows + start_m,
                           offs_d, N_Q, sm_scale, qk_scale, stride_qm, stride_qd, stride_dom,
                           stride_dod, HEAD_DIM, BLOCK_D, DOT_PRECISION, DQ_ATOMIC,
                           False)
    if full_end < N_Q:
        dk, dv = _bwd_step(dk, dv, k, v, key_ok, Q, DO, LSE, DELTA, DQ_ACC, rows + full_end,
                           offs_d, N_Q, sm_scale, qk_scale, stride_qm, stride_qd, stride_dom,
                           stride_dod, HEAD_DIM, BLOCK_D, DOT_PRECISION, DQ_ATOMIC,
                           True)

    mask = _tile_mask(keys, N_K, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(_tile_ptrs(DK, keys, offs_d, HEAD_DIM, 1), (dk * sm_scale).to(DK.dtype.element_ty),
             mask=mask)
    tl.store(_tile_ptrs(DV, keys, offs_d, HEAD_DIM, 1), dv.to(DV.dtype.element_ty),
             mask=mask)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, keys, N_K, offs_d, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
             MASK_KEYS: tl.constexpr):
    k = _load_tile(k_ptrs, keys, N_K, offs_d, HEAD_DIM, BLOCK_D, MASK_KEYS)
    v = _load_tile(v_ptrs, keys, N_K, offs_d, HEAD_DIM, BLOCK_D, MASK_KEYS)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASK_KEYS:  # k = 0 past N_K: exp2(-lse) there need not even be finite
        p = tl.where((keys < N_K)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION, out_dtype=dq.dtype)


@triton.jit(do_not_specialize=LENGTHS)
def attn_bwd_dq(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query tile (BLOCK_M queries), looping over all key tiles (BLOCK_N each). Runs
    first on the deterministic path: its prologue computes delta = rowsum(dO * O) of its own rows
    (it holds their dO tile anyway) and stores it ([B*H, N_Q] contiguous) for `attn_bwd`, so the
    preprocess kernel is not launched there."""
    off_bh, start_m = _head_and_tile(N_Q, BLOCK_M)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    O += off_b * stride_ob + off_h * stride_oh
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += off_bh.to(tl.int64) * N_Q
    DELTA += off_bh.to(tl.int64) * N_Q
    DQ += off_b * stride_dqb + off_h * stride_dqh

    rows = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_m = rows < N_Q
    q = _load_tile(_tile_ptrs(Q, rows, offs_d, stride_qm, stride_qd), rows, N_Q, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_tile(_tile_ptrs(DO, rows, offs_d, stride_dom, stride_dod), rows, N_Q, offs_d,
                    HEAD_DIM, BLOCK_D, True)
    o = _load_tile(_tile_ptrs(O, rows, offs_d, stride_om, stride_od), rows, N_Q, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)  # rows past N_Q: 0
    tl.store(DELTA + rows, delta, mask=mask_m)
    lse = tl.load(LSE + rows, mask=mask_m, other=0.0).to(ACC_DTYPE) * _log2e()
    k_ptrs = _tile_ptrs(K, keys, offs_d, stride_kn, stride_kd)
    v_ptrs = _tile_ptrs(V, keys, offs_d, stride_vn, stride_vd)
    k_step = BLOCK_N * stride_kn.to(tl.int64)
    v_step = BLOCK_N * stride_vn.to(tl.int64)
    qk_scale = sm_scale * _log2e()

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    full_end = (N_K // BLOCK_N) * BLOCK_N
    for _ in range(0, full_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, keys, N_K, offs_d, qk_scale,
                      HEAD_DIM, BLOCK_D, DOT_PRECISION, False)
        k_ptrs += k_step
        v_ptrs += v_step
    if full_end < N_K:
        dq = _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, keys + full_end, N_K, offs_d,
                      qk_scale, HEAD_DIM, BLOCK_D, DOT_PRECISION, True)

    tl.store(_tile_ptrs(DQ, rows, offs_d, stride_dqm, stride_dqd),
             (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=_tile_mask(rows, N_Q, offs_d, HEAD_DIM, BLOCK_D))
