"""Cosine patch-text logits in Triton.

    out[b, n, c] = s * <x[b, n], t[c]> / (max(|x[b, n]|, eps) * max(|t[c]|, eps))

x [B, N, E] is read as R = B * N rows (any strides), text t [C, E], s = logit_scale (a 0-d
tensor, read on the device: no host sync). eps = 1e-12 as in `F.normalize`.

Forward (`ptl_fwd`): one program per (row tile, text tile) computes the raw dot products and both
sets of squared norms in one loop over E, then scales: normalisation, product and scale fused.
Every kernel runs on a flat grid (all programs on axis 0): B * N rows and C classes may each
need more tiles than the 65535 programs CUDA allows on grid axes 1 and 2. Sizes are not
specialised (`do_not_specialize`): a new B, N or class count never recompiles.
Offsets into tensors are int64 throughout, so no index * stride product wraps around at 2**31.

Backward, with xn = x / rx, tn = t / rt, cos = <xn, tn> and g = dout (see
armfast/ops/_specs.py, patch_text_logits_backward):
  `row_norm`:      |x| per row and |t| per text row (unclamped; the kernels clamp);
  `ptl_bwd_gcos`:  g * cos, the [R, C] tile product, recomputed like the forward; torch sums it
                   to gc_row (sum over c), gc_col (sum over rows) and dlogit_scale (sum of all);
  `ptl_bwd_dx`:    dx = (s g tn - [|x| >= eps] xn s gc_row) / rx, one program per (row tile,
                   E tile) looping over the text tiles;
  `ptl_bwd_dtext`: dt = (s g^T xn - [|t| >= eps] tn s gc_col) / rt, one program per (text tile,
                   E tile) looping over all B * N rows.
(<s g tn, xn> = s gc_row and <s g^T xn, tn> = s gc_col, so the projections need no extra pass.)
Every output element has one owner and every reduction a fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting

INTERPRET = interpreting()  # the mode the kernels below are built in



@triton.jit
def _norm_eps():
    """torch.nn.functional.normalize's default eps (an inlined function, not a tl.constexpr
    global: Triton re-checks every global a kernel reads on each launch)."""
    return 1e-12


SIZES = ["R", "N", "C", "E"]  # runtime values, never compile-time specialisations


def _configs(tiles):
    return [triton.Config({"BLOCK_R": r, "BLOCK_C": c, "BLOCK_E": e}, num_warps=w, num_stages=s)
            for r, c, e, w, s in tiles]


# Config lists, (BLOCK_R, BLOCK_C, BLOCK_E, num_warps, num_stages), first = the default when
# nothing is measured; `kind` is "half", "tf32" or "fp32" (float32 FMAs, no tensor cores), as in
# attention.py. tests/triton/test_triton_compile.py checks that the sm90 half-precision ones
# emit wgmma and spill nothing.
def fwd_configs(family: str, kind: str) -> list[triton.Config]:
    """ptl_fwd and ptl_bwd_gcos: a [BLOCK_R, BLOCK_C] output tile, BLOCK_E features per step."""
    if kind == "fp32":
        return _configs([(64, 32, 32, 4, 2), (32, 32, 32, 4, 2)])
    if family in ("sm90", "sm80"):
        return _configs([(128, 64, 64, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)])
    return _configs([(64, 64, 32, 4, 2), (64, 32, 32, 4, 2)])


def dx_configs(family: str, kind: str) -> list[triton.Config]:
    """ptl_bwd_dx: a [BLOCK_R, BLOCK_E] output tile, BLOCK_C classes per step."""
    if kind == "fp32":
        return _configs([(64, 32, 32, 4, 2), (32, 32, 32, 4, 2)])
    if family in ("sm90", "sm80"):
        return _configs([(128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (64, 32, 128, 4, 3)])
    return _configs([(64, 32, 64, 4, 2), (32, 32, 64, 4, 2)])


def dtext_configs(family: str, kind: str) -> list[triton.Config]:
    """ptl_bwd_dtext: a [BLOCK_C, BLOCK_E] output tile, BLOCK_R rows per step."""
    if kind == "fp32":
        return _configs([(32, 32, 32, 4, 2), (32, 64, 32, 4, 2)])
    if family in ("sm90", "sm80"):
        return _configs([(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3)])
    return _configs([(32, 64, 64, 4, 2), (32, 32, 64, 4, 2)])


INTERPRET_CONFIG = triton.Config({"BLOCK_R": 32, "BLOCK_C": 32, "BLOCK_E": 32})
ROW_NORM_BLOCK_R, ROW_NORM_BLOCK_E = 32, 64


# Row indices r < R stay int32 (the cheaper division by N); `_row_offsets` widens them to int64
# before they meet a stride. Text and feature indices are int64 from the start (`_tile_range`).
@triton.jit
def _row_offsets(rows, N, stride_b, stride_n):
    """Offsets of rows r = b * N + n of a [B, N, ...] tensor with strides (stride_b, stride_n)."""
    return (rows // N).to(tl.int64) * stride_b + (rows % N).to(tl.int64) * stride_n


@triton.jit
def _tile_range(tile, BLOCK: tl.constexpr):
    """The int64 indices tile * BLOCK, ..., tile * BLOCK + BLOCK - 1."""
    return tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _flat_tiles(N_INNER, BLOCK_INNER: tl.constexpr):
    """(outer tile, inner tile) of this program on a flat grid of outer x inner tiles, the inner
    tiles of one outer tile adjacent (they share its rows, which then stay in L2)."""
    pid = tl.program_id(0)
    inner_tiles = tl.cdiv(N_INNER, BLOCK_INNER)
    return pid // inner_tiles, pid % inner_tiles


@triton.jit
def _cos_tile(X, T, x_rows, mask_r, offs_c, C, E, stride_xe, stride_tc, stride_te,
              ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """<x_r, t_c> / (max(|x_r|, eps) max(|t_c|, eps)) for a [BLOCK_R, BLOCK_C] tile in one pass
    over E; `x_rows` are the rows' offsets into X, `mask_r` says which rows exist."""
    mask_c = offs_c < C
    offs_e = tl.arange(0, BLOCK_E).to(tl.int64)
    dots = tl.zeros([BLOCK_R, BLOCK_C], ACC_DTYPE)
    x_sq = tl.zeros([BLOCK_R], ACC_DTYPE)
    t_sq = tl.zeros([BLOCK_C], ACC_DTYPE)
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + offs_e
        mask_e = cols < E
        x = tl.load(X + x_rows[:, None] + cols[None, :] * stride_xe,
                    mask=mask_r[:, None] & mask_e[None, :], other=0.0)
        t = tl.load(T + offs_c[:, None] * stride_tc + cols[None, :] * stride_te,
                    mask=mask_c[:, None] & mask_e[None, :], other=0.0)
        dots = tl.dot(x, tl.trans(t), dots, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        xf = x.to(ACC_DTYPE)
        tf = t.to(ACC_DTYPE)
        x_sq += tl.sum(xf * xf, 1)
        t_sq += tl.sum(tf * tf, 1)
    x_norm = tl.maximum(tl.sqrt(x_sq), _norm_eps())
    t_norm = tl.maximum(tl.sqrt(t_sq), _norm_eps())
    return dots / (x_norm[:, None] * t_norm[None, :])


@triton.jit(do_not_specialize=SIZES)
def ptl_fwd(
    X, T, SCALE, OUT,
    stride_xb, stride_xn, stride_xe,
    stride_tc, stride_te,
    stride_ob, stride_on, stride_oc,
    R, N, C, E,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
):
    row_tile, text_tile = _flat_tiles(C, BLOCK_C)
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = _tile_range(text_tile, BLOCK_C)
    mask_r = rows < R
    x_rows = _row_offsets(rows, N, stride_xb, stride_xn)
    cos = _cos_tile(X, T, x_rows, mask_r, offs_c, C, E, stride_xe, stride_tc, stride_te,
                    ACC_DTYPE, DOT_PRECISION, BLOCK_R, BLOCK_C, BLOCK_E)
    out = cos * tl.load(SCALE).to(ACC_DTYPE)
    out_rows = _row_offsets(rows, N, stride_ob, stride_on)
    tl.store(OUT + out_rows[:, None] + offs_c[None, :] * stride_oc, out.to(OUT.dtype.element_ty),
             mask=mask_r[:, None] & (offs_c < C)[None, :])


@triton.jit(do_not_specialize=["R", "N", "E"])
def row_norm(
    X, NORM,
    stride_xb, stride_xn, stride_xe,
    R, N, E,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """NORM[r] = |x_r| (unclamped) for the R = B * N rows of a [B, N, E] tensor."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    x_rows = _row_offsets(rows, N, stride_xb, stride_xn)
    offs_e = tl.arange(0, BLOCK_E).to(tl.int64)
    sq = tl.zeros([BLOCK_R], ACC_DTYPE)
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + offs_e
        x = tl.load(X + x_rows[:, None] + cols[None, :] * stride_xe,
                    mask=mask_r[:, None] & (cols < E)[None, :], other=0.0).to(ACC_DTYPE)
        sq += tl.sum(x * x, 1)
    tl.store(NORM + rows, tl.sqrt(sq), mask=mask_r)


@triton.jit(do_not_specialize=SIZES)
def ptl_bwd_gcos(
    X, T, DOUT, GCOS,
    stride_xb, stride_xn, stride_xe,
    stride_tc, stride_te,
    stride_gb, stride_gn, stride_gc,
    R, N, C, E,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """GCOS [R, C] (contiguous, accumulator dtype) = dout * cos."""
    row_tile, text_tile = _flat_tiles(C, BLOCK_C)
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = _tile_range(text_tile, BLOCK_C)
    mask_r = rows < R
    mask = mask_r[:, None] & (offs_c < C)[None, :]
    x_rows = _row_offsets(rows, N, stride_xb, stride_xn)
    cos = _cos_tile(X, T, x_rows, mask_r, offs_c, C, E, stride_xe, stride_tc, stride_te,
                    ACC_DTYPE, DOT_PRECISION, BLOCK_R, BLOCK_C, BLOCK_E)
    g_rows = _row_offsets(rows, N, stride_gb, stride_gn)
    g = tl.load(DOUT + g_rows[:, None] + offs_c[None, :] * stride_gc, mask=mask, other=0.0)
    tl.store(GCOS + rows.to(tl.int64)[:, None] * C + offs_c[None, :], g.to(ACC_DTYPE) * cos,
             mask=mask)


@triton.jit(do_not_specialize=SIZES)
def ptl_bwd_dx(
    X, T, DOUT, SCALE, X_NORM, T_NORM, GC_ROW, DX,
    stride_xb, stride_xn, stride_xe,
    stride_tc, stride_te,
    stride_gb, stride_gn, stride_gc,
    stride_dxb, stride_dxn, stride_dxe,
    R, N, C, E,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dx for a [BLOCK_R, BLOCK_E] tile: s g tn summed over all text tiles, then projected."""
    row_tile, e_tile = _flat_tiles(E, BLOCK_E)
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = _tile_range(e_tile, BLOCK_E)
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    mask_r = rows < R
    mask_e = cols < E
    g_rows = _row_offsets(rows, N, stride_gb, stride_gn)

    gxn = tl.zeros([BLOCK_R, BLOCK_E], ACC_DTYPE)  # (g tn)[rows, cols]
    for c0 in range(0, C, BLOCK_C):
        text = c0 + offs_c
        mask_c = text < C
        g = tl.load(DOUT + g_rows[:, None] + text[None, :] * stride_gc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        t = tl.load(T + text[:, None] * stride_tc + cols[None, :] * stride_te,
                    mask=mask_c[:, None] & mask_e[None, :], other=0.0)
        t_norm = tl.maximum(tl.load(T_NORM + text, mask=mask_c, other=1.0), _norm_eps())
        # normalise before the dot: a unit row cannot overflow half precision, g / |t| could
        tn = (t.to(ACC_DTYPE) / t_norm[:, None]).to(t.dtype)
        gxn = tl.dot(g.to(t.dtype), tn, gxn, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    scale = tl.load(SCALE).to(ACC_DTYPE)
    x_rows = _row_offsets(rows, N, stride_xb, stride_xn)
    mask = mask_r[:, None] & mask_e[None, :]
    x = tl.load(X + x_rows[:, None] + cols[None, :] * stride_xe, mask=mask, other=0.0).to(ACC_DTYPE)
    x_norm = tl.load(X_NORM + rows, mask=mask_r, other=1.0)
    x_clamped = tl.maximum(x_norm, _norm_eps())
    # below the eps clamp the norm is a constant and the projection term vanishes
    proj = tl.where(x_norm >= _norm_eps(), tl.load(GC_ROW + rows, mask=mask_r, other=0.0), 0.0)
    xn = x / x_clamped[:, None]
    dx = scale * (gxn - xn * proj[:, None]) / x_clamped[:, None]
    dx_rows = _row_offsets(rows, N, stride_dxb, stride_dxn)
    tl.store(DX + dx_rows[:, None] + cols[None, :] * stride_dxe, dx.to(DX.dtype.element_ty),
             mask=mask)


@triton.jit(do_not_specialize=SIZES)
def ptl_bwd_dtext(
    X, T, DOUT, SCALE, X_NORM, T_NORM, GC_COL, DT,
    stride_xb, stride_xn, stride_xe,
    stride_tc, stride_te,
    stride_gb, stride_gn, stride_gc,
    stride_dtc, stride_dte,
    R, N, C, E,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dtext for a [BLOCK_C, BLOCK_E] tile: s g^T xn summed over all B * N rows, then projected."""
    text_tile, e_tile = _flat_tiles(E, BLOCK_E)
    text = _tile_range(text_tile, BLOCK_C)
    cols = _tile_range(e_tile, BLOCK_E)
    offs_r = tl.arange(0, BLOCK_R)
    mask_c = text < C
    mask_e = cols < E

    gtn = tl.zeros([BLOCK_C, BLOCK_E], ACC_DTYPE)  # (g^T xn)[text, cols]
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + offs_r
        mask_r = rows < R
        g_rows = _row_offsets(rows, N, stride_gb, stride_gn)
        x_rows = _row_offsets(rows, N, stride_xb, stride_xn)
        g = tl.load(DOUT + g_rows[:, None] + text[None, :] * stride_gc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        x = tl.load(X + x_rows[:, None] + cols[None, :] * stride_xe,
                    mask=mask_r[:, None] & mask_e[None, :], other=0.0)
        x_norm = tl.maximum(tl.load(X_NORM + rows, mask=mask_r, other=1.0), _norm_eps())
        xn = (x.to(ACC_DTYPE) / x_norm[:, None]).to(x.dtype)
        gtn = tl.dot(tl.trans(g.to(x.dtype)), xn, gtn, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)

    scale = tl.load(SCALE).to(ACC_DTYPE)
    mask = mask_c[:, None] & mask_e[None, :]
    t = tl.load(T + text[:, None] * stride_tc + cols[None, :] * stride_te, mask=mask,
                other=0.0).to(ACC_DTYPE)
    t_norm = tl.load(T_NORM + text, mask=mask_c, other=1.0)
    t_clamped = tl.maximum(t_norm, _norm_eps())
    proj = tl.where(t_norm >= _norm_eps(), tl.load(GC_COL + text, mask=mask_c, other=0.0), 0.0)
    tn = t / t_clamped[:, None]
    dt = scale * (gtn - tn * proj[:, None]) / t_clamped[:, None]
    tl.store(DT + text[:, None] * stride_dtc + cols[None, :] * stride_dte,
             dt.to(DT.dtype.element_ty),
             mask=mask)
