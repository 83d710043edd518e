// Forward kernels of the training-free baselines' attentions on tensor cores (sm_80 and newer),
// written against Mma<T> of armfast/warp_mma.cuh: float16 / bfloat16 (m16n8k16) and float32 on
// TF32 (m16n8k8). As in flash_fwd.cuh, a block owns BQ = 16 * MT * WARPS query rows, each warp
// keeps its rows' fragments, scores, accumulators and running max / sum in registers, key tiles
// stream through shared memory, and no N x N matrix exists anywhere.
//
// self_corr_fwd_kernel: O = softmax(s X X^T [+ G]) V over the key tiles of X itself (ClearCLIP;
//   NACLIP's G = exp(-dist^2 / (2 sigma^2)) of the tokens' grid positions, computed per score
//   from the token indices, 0 on class tokens). DUAL (SCLIP): X and X2 run in the same pass, two
//   score tiles, two online-softmax states and two accumulators; each V tile is loaded once for
//   both, and O = O1 / l1 + O2 / l2 at the end.
// masked_affinity_fwd_kernel (ProxyCLIP): S = cos(f_i, f_j) from the VFM features (dot products
//   over C in CK-wide chunks, times the inverse row norms of a first pass), S < beta mean(S)
//   masked off the diagonal, softmax(gamma S) online, applied to the values of all heads, read
//   as one [n, H * d] matrix: a block owns 768 of its columns (all of them for H d <= 768), so
//   each tile of S is computed once per image and query tile, not once per head.
//
// Plainly pipelined: each key tile is loaded, then used, between two barriers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention_entry.h"
#include "flash_dispatch.h"

namespace armfast::cuda::baseline {

using flash::accumulate_pv;
using flash::AttnParams;
using flash::ceil_div_int;
using flash::kPad;
using flash::online_softmax;
using flash::QInRegisters;
using flash::QInSharedMemory;
using flash::scores;
using flash::zero;

struct Params {
  AttnParams a;  // self-correlation: q = X, k = X2 (DUAL; X otherwise), v, out; Nq = Nk = N
  // NACLIP's bias: G = exp2(bias_coef_log2 * dist^2), added to the raw scores as G * bias_to_raw
  // (they are multiplied by scale * log2(e) in the softmax); tokens are row-major patches of a
  // grid of width grid_w after `first` class tokens.
  float bias_coef_log2, bias_to_raw;
  int grid_w, first;
  // masked affinity: f [B, n, C]; rnorm [B, n] and thresh [B] (float32, contiguous) from the
  // first pass; values and output as [B, H, n, d] through a.sv / a.so.
  const void* f;
  int64_t sf[3];
  const float *rnorm, *thresh;
  int n, C, H, d, value_blocks;
  float gamma_log2;
  bool vec_f;  // 16-byte feature loads: unit feature stride, aligned rows, C a multiple of the chunk
  // split keys (too few blocks to fill the GPU): `splits` ranges of keys_per_split keys each write
  // their unnormalised rows to `workspace` (acc [splits][B][n][value_blocks * 768], then (max, sum)
  // [splits][B][n][2]) and a second kernel combines them; splits == 1: straight to the output
  int splits, keys_per_split;
  float* workspace;
};

// Grid position of token t: row, column, and whether it is a patch (not a class token).
struct GridPos {
  float r, c;
  bool patch;
};
__device__ __forceinline__ GridPos grid_pos(int t, int grid_w, int first) {
  const int p = t - first;
  if (p < 0) return {0.0f, 0.0f, false};
  return {static_cast<float>(p / grid_w), static_cast<float>(p % grid_w), true};
}

// ---- self-correlation: ClearCLIP, SCLIP (DUAL), NACLIP (BIAS) -----------------------------------

template <typename T, int D_, bool DUAL_, bool BIAS_>
struct SelfCorrConfig {
  using Elem = T;
  static constexpr bool DUAL = DUAL_, BIAS = BIAS_;
  static constexpr int D = D_, WARPS = 4, MT = 1;
  // 64-key tiles; 32 where registers or shared memory run short (d = 128, TF32, or two operands
  // of d >= 64)
  static constexpr int BK = (D == 128 || std::is_same_v<T, float> || (DUAL && D >= 64)) ? 32 : 64;
  static constexpr int THREADS = 32 * WARPS, BQ = 16 * MT * WARPS, OPS = DUAL ? 2 : 1;
  static constexpr int LD = D + kPad;
  // The Q fragments stay in registers unless two operands' worth would crowd out the
  // accumulators (TF32 at d = 128): then they are reloaded from shared memory per key tile.
  static constexpr bool Q_IN_REGISTERS = !DUAL || OPS * MT * (D / Mma<T>::K) * 4 <= 64;
  static constexpr size_t Q = 0;                                 // OPS x [BQ][LD]
  static constexpr size_t K = Q + sizeof(T) * OPS * BQ * LD;      // OPS x [BK][LD]
  static constexpr size_t V = K + sizeof(T) * OPS * BK * LD;      // [BK][LD]
  static constexpr size_t SMEM = V + sizeof(T) * BK * LD;
  static_assert(!(DUAL && BIAS), "the Gaussian bias takes one operand");
  static_assert(D % 16 == 0 && BK % 16 == 0, "tiles are whole 16 x 16 blocks");
};

template <class C>
__global__ void __launch_bounds__(C::THREADS) self_corr_fwd_kernel(const Params prm) {
  using T = typename C::Elem;
  using M = Mma<T>;
  constexpr int D = C::D, MT = C::MT, BK = C::BK, BQ = C::BQ, LD = C::LD, THREADS = C::THREADS, OPS = C::OPS;
  constexpr int KS = D / M::K, NT = BK / 8, DT = D / 8;
  const AttnParams& p = prm.a;

  ARMFAST_DYNAMIC_SMEM(smem);
  T* qs = reinterpret_cast<T*>(smem + C::Q);
  T* ks = reinterpret_cast<T*>(smem + C::K);
  T* vs = reinterpret_cast<T*>(smem + C::V);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const flash::BlockTile w = flash::block_tile(p);
  const int q0 = w.tile * BQ, N = p.Nq;
  const T* xg[2] = {w.slice<const T>(p.q, p.sq), w.slice<const T>(p.k, p.sk)};
  const int64_t rs[2] = {p.sq[2], p.sk[2]}, cs[2] = {p.sq[3], p.sk[3]};
  const bool vec[2] = {p.vec_q, p.vec_k};
  const T* vg = w.slice<const T>(p.v, p.sv);

#pragma unroll
  for (int o = 0; o < OPS; ++o)
    flash::load_rows<T, BQ, D, THREADS>(qs + o * BQ * LD, LD, xg[o], rs[o], cs[o], q0, std::min(BQ, N - q0), vec[o]);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int wrow = warp * MT * 16;
  constexpr bool QREG = C::Q_IN_REGISTERS;
  uint32_t qf[OPS][MT][QREG ? KS : 1][4];
  auto load_q = [&](uint32_t (&frag)[MT][KS][4], int o) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kk = 0; kk < KS; ++kk)
        M::load_a(frag[mt][kk], qs + o * BQ * LD + (wrow + 16 * mt) * LD + kk * M::K, LD);
  };
  float acc[OPS][MT][DT][4], row_max[OPS][MT][2], row_sum[OPS][MT][2];
#pragma unroll
  for (int o = 0; o < OPS; ++o) {
    if constexpr (QREG) load_q(qf[o], o);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      row_max[o][mt][0] = row_max[o][mt][1] = -INFINITY;
      row_sum[o][mt][0] = row_sum[o][mt][1] = 0.0f;
    }
    zero(acc[o]);
  }
  GridPos qpos[MT][2];  // NACLIP: the grid positions of the lane's two rows per m16 tile
  if constexpr (C::BIAS) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        qpos[mt][half] = grid_pos(q0 + wrow + 16 * mt + mma::c_row(lane, 2 * half), prm.grid_w, prm.first);
  }

  for (int k0 = 0; k0 < N; k0 += BK) {
    const int nk = std::min(BK, N - k0);
#pragma unroll
    for (int o = 0; o < OPS; ++o)
      flash::load_rows<T, BK, D, THREADS>(ks + o * BK * LD, LD, xg[o], rs[o], cs[o], k0, nk, vec[o]);
    flash::load_rows<T, BK, D, THREADS>(vs, LD, vg, p.sv[2], p.sv[3], k0, nk, p.vec_v);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

#pragma unroll
    for (int o = 0; o < OPS; ++o) {
      float s[MT][NT][4];
      zero(s);
      if constexpr (QREG) {
        scores<T, MT, NT, KS>(s, QInRegisters<MT, KS>{qf[o]}, ks + o * BK * LD, LD);
      } else {
        scores<T, MT, NT, KS>(s, QInSharedMemory<T>{qs + o * BQ * LD + wrow * LD, LD}, ks + o * BK * LD, LD);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = 8 * nt + mma::c_col(lane, e);
            if constexpr (C::BIAS) {
              const GridPos q = qpos[mt][e >> 1], k = grid_pos(k0 + col, prm.grid_w, prm.first);
              if (q.patch && k.patch) {
                const float dr = q.r - k.r, dc = q.c - k.c;
                s[mt][nt][e] += exp2f(prm.bias_coef_log2 * (dr * dr + dc * dc)) * prm.bias_to_raw;
              }
            }
            if (col >= nk) s[mt][nt][e] = -INFINITY;  // keys past N
          }
      online_softmax(s, row_max[o], row_sum[o], acc[o], p.scale_log2);
      accumulate_pv<T>(acc[o], s, vs, LD);
    }
    __syncthreads();  // every warp is done with this key tile
  }

  // O = sum over operands of acc / l, gathered in acc[0]; every row saw real keys, so l >= 1
  float ones[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      ones[mt][half] = 1.0f;
      float inv[OPS];
#pragma unroll
      for (int o = 0; o < OPS; ++o) inv[o] = 1.0f / quad_sum(row_sum[o][mt][half]);
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          float x = acc[0][mt][dt][e] * inv[0];
#pragma unroll
          for (int o = 1; o < OPS; ++o) x += acc[o][mt][dt][e] * inv[o];
          acc[0][mt][dt][e] = x;
        }
    }
  T* og = w.slice<T>(p.out, p.so);
  // The warp's own Q rows are free now (its fragments are in registers).
  flash::store_acc_rows<T, MT, DT>(acc[0], ones, qs + wrow * LD, LD, og, p.so[2], p.so[3], q0 + wrow, N, p.vec_o);
}

// ---- masked affinity: ProxyCLIP -------------------------------------------------------------------
//
// The map softmax(gamma S) is one per image, shared by all H heads, so a block owns BQ query rows
// of one image and DVB = 768 value columns (every head of a ViT-B: H d = 768): each tile of S is
// computed once and applied to all of them (wider values take ceil(H d / 768) column blocks, each
// computing S again). The accumulator, BQ x DVB floats (32 x 768: 96 KiB), cannot live in one
// warp's registers, so the block's 8 warps split it: 2 row groups of 16 rows times 4 column groups
// of 192 columns, 96 floats per thread. S is computed cooperatively into shared memory, each warp
// one 16 x 16 piece (or a share of its k steps, where a tile has fewer pieces than warps), and every
// warp reads back its rows' scores. The 4 warps of a row group repeat the rows' online softmax (the
// same numbers in the same order give the same max and sum) instead of exchanging it: 16 x BK
// exponentials per warp and tile, against 16 x BK x 192 x 2 FLOPs of P V. (Why not one warp set
// looping over column chunks of a stored S tile: the online softmax rescales every column of a
// row whenever its max grows, so all 768 columns stay live for the whole key loop; split over the
// warps they stay in registers. Split over blocks, S would be computed once per block.)
//
// S is float32 whatever T: products of two 16-bit values are exact in the float32 accumulators; for
// float32 features each product is split into TF32 parts (hi hi + hi lo + lo hi: 3 mma), so the mask
// S < beta mean(S), a discrete decision, is taken on float32 affinities.

// SMALL: half the keys per tile, for GPUs with under ~128 KiB of shared memory per block (sm_86,
// sm_89: 99 KiB); more k-step sharing in S, the same accumulators.
template <typename T, bool SMALL>
struct AffinityConfig {
  using Elem = T;
  static constexpr bool SPLIT_TF32 = std::is_same_v<T, float>;
  static constexpr int WARPS = 8, THREADS = 32 * WARPS;
  static constexpr int BQ = 32, ROW_GROUPS = BQ / 16, COL_GROUPS = WARPS / ROW_GROUPS;
  // keys per tile: the V tile [BK][DVB] takes 97 KiB of shared memory (49 KiB when SMALL)
  static constexpr int BK = (SPLIT_TF32 ? 32 : 64) / (SMALL ? 2 : 1);
  static constexpr int CK = 64;  // features per chunk of S = F F^T
  static constexpr int DVB = 768, WCOLS = DVB / COL_GROUPS, DT = WCOLS / 8, NT = BK / 8;
  static constexpr int PIECES = (BQ / 16) * (BK / 16), KSPLIT = WARPS / PIECES;
  static constexpr int LDF = CK + kPad, LDV = DVB + kPad, LDS = BK + 4;
  static constexpr size_t FQ = 0;                                       // [BQ][LDF]
  static constexpr size_t FK = FQ + sizeof(T) * BQ * LDF;               // [BK][LDF]
  static constexpr size_t V = FK + sizeof(T) * BK * LDF;                // [BK][LDV]
  static constexpr size_t S = V + sizeof(T) * BK * LDV;                 // KSPLIT x [BQ][LDS] float
  static constexpr size_t SMEM = S + sizeof(float) * KSPLIT * BQ * LDS;
  static_assert(WARPS % PIECES == 0 && (CK / Mma<T>::K) % KSPLIT == 0, "whole pieces and k steps per warp");
  static_assert(WCOLS % 16 == 0 && BK % 16 == 0, "tiles are whole 16 x 16 blocks");
};

// dst[r][c] = src[(row0 + r) * rs + (col0 + c) * cs] for r < nrows, c < ncols, else 0.
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_block(T* dst, int ld, const T* src, int64_t rs, int64_t cs, int row0, int nrows,
                                           int col0, int ncols) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += THREADS) {
    const int r = idx / COLS, c = idx % COLS;
    dst[r * ld + c] = r < nrows && c < ncols ? src[(row0 + r) * rs + static_cast<int64_t>(col0 + c) * cs]
                                             : from_float<T>(0.0f);
  }
}

// Rows row0 .. row0 + ROWS - 1 (valid below nrows), features c0 .. c0 + CK - 1 of f [n, C] into
// dst [ROWS][LDF]; cp.async when `vec` (unit feature stride, aligned rows, C a multiple of CK).
template <class C, int ROWS>
__device__ __forceinline__ void load_features(typename C::Elem* dst, const typename C::Elem* fb, const int64_t (&sf)[3],
                                              int row0, int nrows, int c0, int ncols, bool vec) {
  if (vec)
    flash::load_rows<typename C::Elem, ROWS, C::CK, C::THREADS>(dst, C::LDF, fb + c0, sf[1], 1, row0, nrows, true);
  else
    load_block<typename C::Elem, ROWS, C::CK, C::THREADS>(dst, C::LDF, fb, sf[1], sf[2], row0, nrows, c0, ncols);
}

// Keys k0 .. k0 + nk - 1 of value columns col0 .. col0 + DVB - 1 of v seen as [n, H * d] (column c:
// head c / d, element c % d) into vs [BK][LDV]; past the keys or the columns, zeros. With `vec`
// (unit element stride, aligned rows, d a multiple of the 16-byte chunk: no chunk straddles two
// heads) as cp.async 16-byte copies.
template <class C>
__device__ __forceinline__ void load_values(typename C::Elem* vs, const typename C::Elem* vb, const int64_t (&sv)[4],
                                            int d, int value_width, int col0, int k0, int nk, bool vec) {
  using T = typename C::Elem;
  if (vec) {
    constexpr int PER = 16 / sizeof(T), CHUNKS = C::DVB / PER;
    for (int idx = threadIdx.x; idx < C::BK * CHUNKS; idx += C::THREADS) {
      const int r = idx / CHUNKS, c = (idx % CHUNKS) * PER, col = col0 + c;
      const bool ok = r < nk && col < value_width;
      cp_async_16(vs + r * C::LDV + c, ok ? vb + (col / d) * sv[1] + (k0 + r) * sv[2] + col % d : vb, ok ? 16 : 0);
    }
  } else {
    for (int idx = threadIdx.x; idx < C::BK * C::DVB; idx += C::THREADS) {
      const int r = idx / C::DVB, c = idx % C::DVB, col = col0 + c;
      vs[r * C::LDV + c] = r < nk && col < value_width ? vb[(col / d) * sv[1] + (k0 + r) * sv[2] + (col % d) * sv[3]]
                                                       : from_float<T>(0.0f);
    }
  }
}

// float32 x as TF32 hi + lo (both rounded, as the tensor cores take them).
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  float h;
  memcpy(&h, &hi, sizeof h);
  lo = to_tf32(x - h);
}

// dots[2][4] += the 16 x 16 piece of F_q F_k^T at fq (16 rows of pitch LDF) and fk (16 keys), over
// this warp's share of the chunk's k steps (kk = part, part + KSPLIT, ...).
template <class C>
__device__ __forceinline__ void piece_dots(float (&dots)[2][4], const typename C::Elem* fq,
                                           const typename C::Elem* fk, int part) {
  using T = typename C::Elem;
  using M = Mma<T>;
  constexpr int LD = C::LDF;
#pragma unroll
  for (int kk = part; kk < C::CK / M::K; kk += C::KSPLIT) {
    if constexpr (C::SPLIT_TF32) {
      // the A and B fragments of Mma<float> (see warp_mma.cuh), read unrounded and split
      const int lane = threadIdx.x % 32, g = mma::lane_group(lane), t = mma::lane_quad(lane);
      const float* a = fq + kk * M::K;
      const float av[4] = {a[g * LD + 2 * t], a[(g + 8) * LD + 2 * t], a[g * LD + 2 * t + 1], a[(g + 8) * LD + 2 * t + 1]};
      uint32_t ahi[4], alo[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) split_tf32(av[i], ahi[i], alo[i]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float* b = fk + (8 * j + g) * LD + kk * M::K + 2 * t;
        uint32_t bhi[2], blo[2];
        split_tf32(b[0], bhi[0], blo[0]);
        split_tf32(b[1], bhi[1], blo[1]);
        mma_sync<T>(dots[j], alo, bhi);  // the small terms first
        mma_sync<T>(dots[j], ahi, blo);
        mma_sync<T>(dots[j], ahi, bhi);
      }
    } else {
      uint32_t a[4], b[2][2];
      M::load_a(a, fq + kk * M::K, LD);
      M::load_b(b, fk + kk * M::K, LD);
      mma_sync<T>(dots[0], a, b[0]);
      mma_sync<T>(dots[1], a, b[1]);
    }
  }
}

template <class C>
__global__ void __launch_bounds__(C::THREADS, 1) masked_affinity_fwd_kernel(const Params prm) {
  using T = typename C::Elem;
  constexpr int BK = C::BK, BQ = C::BQ, LDS = C::LDS, NT = C::NT, DT = C::DT;
  const AttnParams& p = prm.a;

  ARMFAST_DYNAMIC_SMEM(smem);
  T* fq = reinterpret_cast<T*>(smem + C::FQ);
  T* fk = reinterpret_cast<T*>(smem + C::FK);
  T* vs = reinterpret_cast<T*>(smem + C::V);
  float* ss = reinterpret_cast<float*>(smem + C::S);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // blockIdx.x = ((b * value_blocks + value block) * splits + split) * n_tiles + query tile
  const int tile = blockIdx.x % p.n_tiles;
  const int64_t rest = blockIdx.x / p.n_tiles, vblock = rest / prm.splits, b = vblock / prm.value_blocks;
  const int split = static_cast<int>(rest % prm.splits);
  const int col0 = static_cast<int>(vblock % prm.value_blocks) * C::DVB;  // first value column of the block
  const int n = prm.n, q0 = tile * BQ, nq = std::min(BQ, n - q0);
  const int k_begin = split * prm.keys_per_split, k_end = std::min(n, k_begin + prm.keys_per_split);
  const int value_width = prm.H * prm.d;
  const T* fb = static_cast<const T*>(prm.f) + b * prm.sf[0];
  const T* vb = static_cast<const T*>(p.v) + b * p.sv[0];
  const float* rn = prm.rnorm + b * n;
  const float thresh = prm.thresh[b];

  // the piece of S this warp computes: 16 rows at prow, 16 keys at pcol, k steps part, part + KSPLIT, ..
  const int piece = warp % C::PIECES, part = warp / C::PIECES;
  const int prow = (piece % C::ROW_GROUPS) * 16, pcol = (piece / C::ROW_GROUPS) * 16;
  // the accumulator this warp owns: rows wrow .. wrow + 15, value columns wcol .. wcol + WCOLS - 1
  const int wrow = (warp % C::ROW_GROUPS) * 16, wcol = (warp / C::ROW_GROUPS) * C::WCOLS;

  float rq[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = q0 + wrow + mma::c_row(lane, 2 * half);
    rq[half] = row < n ? rn[row] : 0.0f;
  }
  float acc[1][DT][4], row_max[1][2], row_sum[1][2];
  zero(acc);
  row_max[0][0] = row_max[0][1] = -INFINITY;
  row_sum[0][0] = row_sum[0][1] = 0.0f;

  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    const int nk = std::min(BK, n - k0);
    // the V tile streams in while S is computed (the chunks' first wait covers it)
    load_values<C>(vs, vb, p.sv, prm.d, value_width, col0, k0, nk, p.vec_v);
    float dots[2][4] = {};
    for (int c0 = 0; c0 < prm.C; c0 += C::CK) {  // S = F_q F_k^T, CK features at a time
      load_features<C, BQ>(fq, fb, prm.sf, q0, nq, c0, prm.C - c0, prm.vec_f);
      load_features<C, BK>(fk, fb, prm.sf, k0, nk, c0, prm.C - c0, prm.vec_f);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      piece_dots<C>(dots, fq + prow * C::LDF, fk + pcol * C::LDF, part);
      __syncthreads();  // before the next chunk overwrites fq, fk
    }
    float* sp = ss + part * BQ * LDS;  // this warp's share of the piece, summed when read
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        sp[(prow + mma::c_row(lane, e)) * LDS + pcol + 8 * j + mma::c_col(lane, e)] = dots[j][e];
    __syncthreads();  // the S tile (and the V tile) in place

    // this warp's rows of the tile: gamma (S - beta mean(S)) as the reference writes it (the
    // softmax of gamma S, shifted), -inf where S < beta mean(S) off the diagonal or past the keys;
    // a NaN threshold leaves every score NaN, as in the reference
    float s[1][NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = wrow + mma::c_row(lane, e), c = 8 * nt + mma::c_col(lane, e), key = k0 + c;
        float dot = ss[r * LDS + c];
#pragma unroll
        for (int k = 1; k < C::KSPLIT; ++k) dot += ss[k * BQ * LDS + r * LDS + c];
        const float cosine = dot * rq[e >> 1] * (key < n ? rn[key] : 0.0f);
        const bool masked = key >= n || (cosine < thresh && q0 + r != key);  // the diagonal always stays
        s[0][nt][e] = masked ? -INFINITY : cosine - thresh;
      }
    online_softmax(s, row_max, row_sum, acc, prm.gamma_log2);
    accumulate_pv<T>(acc, s, vs + wcol, C::LDV);
    __syncthreads();  // every warp is done with the S and V tiles
  }

  if (prm.splits > 1) {  // this key range's unnormalised rows and their (max, sum)
    const int64_t width = static_cast<int64_t>(prm.value_blocks) * C::DVB;
    float* ws = prm.workspace + (split * p.BH + b) * n * width;  // p.BH: the images
    float* ml = prm.workspace + prm.splits * p.BH * n * width + (split * p.BH + b) * n * 2;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = q0 + wrow + mma::c_row(lane, 2 * half);
      const float sum = quad_sum(row_sum[0][half]);
      if (row >= n) continue;
      if (col0 == 0 && wcol == 0 && mma::lane_quad(lane) == 0) {
        ml[row * 2] = row_max[0][half];
        ml[row * 2 + 1] = sum;
      }
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        store_pair<float>(ws + row * width + col0 + wcol + 8 * dt + mma::c_col(lane, 2 * half), acc[0][dt][2 * half],
                          acc[0][dt][2 * half + 1]);
    }
    return;
  }
  // the diagonal is never masked, so every stored row has l >= 1 (or NaN, as the reference)
  T* out = static_cast<T*>(p.out) + b * p.so[0];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = q0 + wrow + mma::c_row(lane, 2 * half);
    const float inv = 1.0f / quad_sum(row_sum[0][half]);
    if (row >= n) continue;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e) {
        const int col = col0 + wcol + 8 * dt + mma::c_col(lane, e);
        if (col < value_width)
          out[(col / prm.d) * p.so[1] + row * p.so[2] + (col % prm.d) * p.so[3]] = from_float<T>(acc[0][dt][e] * inv);
      }
  }
}

// The key ranges' rows combined (split keys): out = sum_s acc_s 2^((m_s - M) gamma log2 e) / the
// same sum of l_s, M = max_s m_s, as flash-decoding does; one thread per output element.
template <typename T>
__global__ void __launch_bounds__(256) masked_affinity_combine_kernel(const Params prm) {
  const AttnParams& p = prm.a;
  const int width = prm.H * prm.d;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.BH * prm.n * width) return;
  const int col = static_cast<int>(idx % width);
  const int64_t bn = idx / width, b = bn / prm.n, row = bn % prm.n;
  const int64_t padded = static_cast<int64_t>(prm.value_blocks) * 768, images = p.BH;
  const float* ml = prm.workspace + prm.splits * images * prm.n * padded;
  float m = -INFINITY;
  for (int sp = 0; sp < prm.splits; ++sp) m = fmaxf(m, ml[((sp * images + b) * prm.n + row) * 2]);
  const float m_scaled = m == -INFINITY ? 0.0f : m * prm.gamma_log2;
  float num = 0.0f, den = 0.0f;
  for (int sp = 0; sp < prm.splits; ++sp) {
    const int64_t r = (sp * images + b) * prm.n + row;
    const float ms = ml[r * 2];
    const float w = ms == -INFINITY ? 0.0f : exp2f(ms * prm.gamma_log2 - m_scaled);  // a range of masked keys: 0
    num += prm.workspace[r * padded + col] * w;
    den += ml[r * 2 + 1] * w;
  }
  T* out = static_cast<T*>(p.out) + b * p.so[0];
  out[(col / prm.d) * p.so[1] + row * p.so[2] + (col % prm.d) * p.so[3]] = from_float<T>(num / den);
}

// ---- host side: parameters, tile choice and launches (the launcher runs them: on the GPU, or in
// the tests' emulator) ------------------------------------------------------------------------------

template <class C>
std::string kernel_name(const char* kernel) {
  return std::string(kernel) + "<" + flash::dtype_name<typename C::Elem>() + ">";
}

template <class C>
void check_smem(const char* what, int d, const DeviceLimits& dev) {
  if (C::SMEM > dev.smem) too_little_smem(what, flash::dtype_name<typename C::Elem>(), d, C::SMEM, dev);
}

// x, x2 (SCLIP's second operand; data null: none), v, out [B, H, N, d]; bias: NACLIP's grid or null.
template <typename T, class Launcher>
void self_correlation(const SelfCorrelationShape& s, const Strided& x, const Strided& x2, const Strided& v,
                      const Strided& out, float scale, const GridBias* bias, const DeviceLimits& dev,
                      Launcher&& launch) {
  Params prm{};
  AttnParams& p = prm.a;
  p = flash::base_params({s.B, s.H, s.N, s.N, s.d}, scale);
  const bool dual = x2.data != nullptr;
  const Strided& y = dual ? x2 : x;
  p.q = x.data, p.k = y.data, p.v = v.data, p.out = out.data;
  copy_strides(p.sq, x, 4), copy_strides(p.sk, y, 4), copy_strides(p.sv, v, 4);
  copy_strides(p.so, out, 4);
  p.vec_q = vec_ok<T>(x), p.vec_k = vec_ok<T>(y), p.vec_v = vec_ok<T>(v);
  p.vec_o = vec_ok<T>(out);
  if (bias != nullptr) {
    if (dual) throw std::invalid_argument("armfast CUDA self-correlation: the Gaussian bias takes one operand");
    prm.bias_coef_log2 = static_cast<float>(-kLog2e / (2.0 * bias->sigma * bias->sigma));
    prm.bias_to_raw = 1.0f / scale;
    prm.grid_w = static_cast<int>(bias->w), prm.first = bias->class_token ? 1 : 0;
  }
  auto run = [&](auto config) {
    using C = decltype(config);
    check_smem<C>("self-correlation", C::D, dev);
    p.n_tiles = ceil_div_int(p.Nq, C::BQ);
    launch(self_corr_fwd_kernel<C>, kernel_name<C>("self_corr_fwd_kernel"), p.BH * p.n_tiles, C::THREADS, C::SMEM,
           prm);
  };
  with_head_dim(s.d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    if (dual) run(SelfCorrConfig<T, D, true, false>{});
    else if (bias != nullptr) run(SelfCorrConfig<T, D, false, true>{});
    else run(SelfCorrConfig<T, D, false, false>{});
  });
}

// Key ranges per (image, query tile) for masked_affinity: enough blocks to fill the GPU when the
// images and query tiles alone do not (a batch of one), at most 8 ranges of at least 128 keys.
// Ranges are whole multiples of 64 keys, so the choice does not depend on the tiles.
struct AffinitySplit {
  int splits, keys_per_split;
};
inline AffinitySplit affinity_split(const AffinityShape& s, const DeviceLimits& dev) {
  constexpr int kBQ = 32, kDVB = 768, kGrain = 64;
  const int64_t blocks = s.B * ((s.H * s.d + kDVB - 1) / kDVB) * ((s.n + kBQ - 1) / kBQ);
  const int64_t grains = (s.n + kGrain - 1) / kGrain;
  const int64_t want = std::min<int64_t>({8, dev.sms / std::max<int64_t>(blocks, 1), grains / 2});
  if (want < 2) return {1, static_cast<int>(grains * kGrain)};
  const int64_t per = (grains + want - 1) / want;  // grains per range
  return {static_cast<int>((grains + per - 1) / per), static_cast<int>(per * kGrain)};
}

// float32 elements of masked_affinity's workspace (0: it writes the output directly).
inline int64_t masked_affinity_workspace(const AffinityShape& s, const DeviceLimits& dev) {
  const AffinitySplit sp = affinity_split(s, dev);
  if (sp.splits == 1) return 0;
  return sp.splits * s.B * s.n * (((s.H * s.d + 767) / 768) * 768 + 2);
}

// f [B, n, C]; rnorm [B, n], thresh [B]: float32, contiguous (the first pass); v, out [B, H, n, d];
// workspace: masked_affinity_workspace(s, dev) float32 elements (null when 0).
template <typename T, class Launcher>
void masked_affinity(const AffinityShape& s, const Strided& f, const float* rnorm, const float* thresh,
                     const Strided& v, const Strided& out, float gamma, float* workspace, int64_t workspace_size,
                     const DeviceLimits& dev, Launcher&& launch) {
  using Large = AffinityConfig<T, false>;
  using Small = AffinityConfig<T, true>;
  if (s.n > 0x7fffffff || s.C > 0x7fffffff || s.H * s.d > 0x7fffffff)
    throw std::invalid_argument("armfast CUDA masked affinity attention: sizes too large");
  const bool large = Large::SMEM <= dev.smem;
  if (!large) check_smem<Small>("masked affinity", static_cast<int>(s.d), dev);
  Params prm{};
  AttnParams& p = prm.a;
  p.v = v.data, p.out = out.data;
  copy_strides(p.sv, v, 4), copy_strides(p.so, out, 4);
  constexpr int64_t per = 16 / sizeof(T);
  p.vec_v = vec_ok<T>(v) && s.d % per == 0;
  prm.f = f.data;
  copy_strides(prm.sf, f, 3);
  static_assert(Large::CK == Small::CK && Large::DVB == Small::DVB && Large::BQ == Small::BQ, "one grid for both");
  prm.vec_f = f.stride[2] == 1 && reinterpret_cast<std::uintptr_t>(f.data) % 16 == 0 && f.stride[0] % per == 0 &&
              f.stride[1] % per == 0 && s.C % Large::CK == 0;
  prm.rnorm = rnorm, prm.thresh = thresh;
  prm.n = static_cast<int>(s.n), prm.C = static_cast<int>(s.C), prm.H = static_cast<int>(s.H);
  prm.d = static_cast<int>(s.d);
  prm.value_blocks = ceil_div_int(prm.H * prm.d, Large::DVB);
  prm.gamma_log2 = gamma * kLog2e;
  p.n_tiles = ceil_div_int(prm.n, Large::BQ);
  p.BH = s.B;  // the images (the combine and the split rows index by it)
  const AffinitySplit sp = affinity_split(s, dev);
  prm.splits = sp.splits, prm.keys_per_split = sp.keys_per_split;
  if (workspace_size < masked_affinity_workspace(s, dev) || (sp.splits > 1 && workspace == nullptr))
    throw std::invalid_argument("armfast CUDA masked affinity attention: workspace of " +
                                std::to_string(workspace_size) + " floats, expected " +
                                std::to_string(masked_affinity_workspace(s, dev)));
  prm.workspace = workspace;
  static_assert(Large::BQ == 32 && Large::DVB == 768 && 64 % Large::BK == 0 && 64 % Small::BK == 0,
                "affinity_split's sizes");
  auto run = [&](auto config, const char* name) {
    using C = decltype(config);
    launch(masked_affinity_fwd_kernel<C>, kernel_name<C>(name),
           s.B * prm.value_blocks * prm.splits * p.n_tiles, C::THREADS, C::SMEM, prm);
  };
  if (large) run(Large{}, "masked_affinity_fwd_kernel");
  else run(Small{}, "masked_affinity_fwd_kernel_small");
  if (prm.splits > 1) {
    const int64_t elements = s.B * s.n * s.H * s.d;
    launch(masked_affinity_combine_kernel<T>, std::string("masked_affinity_combine_kernel<") +
           flash::dtype_name<T>() + ">", (elements + 255) / 256, 256, 0, prm);
  }
}

}  // namespace armfast::cuda::baseline
