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
//   as one [n, H * d] matrix: a block owns DVB of its columns (DVB / d heads), so the map is
//   computed once per DVB value columns rather than once per head.
//
// Plainly pipelined: each key tile is loaded, then used, between two barriers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
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

template <typename T>
struct AffinityConfig {
  using Elem = T;
  static constexpr int WARPS = 4, MT = 1, BK = 64;
  static constexpr int CK = 64;   // features per chunk of S = F F^T
  static constexpr int DVB = 128; // value columns (of H * d) per block
  static constexpr int THREADS = 32 * WARPS, BQ = 16 * MT * WARPS;
  static constexpr int LDF = CK + kPad, LDV = DVB + kPad;
  static constexpr size_t FQ = 0;                              // [BQ][LDF]
  static constexpr size_t FK = FQ + sizeof(T) * BQ * LDF;      // [BK][LDF]
  static constexpr size_t V = FK + sizeof(T) * BK * LDF;       // [BK][LDV]
  static constexpr size_t SMEM = V + sizeof(T) * BK * LDV;
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

template <class C>
__global__ void __launch_bounds__(C::THREADS) masked_affinity_fwd_kernel(const Params prm) {
  using T = typename C::Elem;
  using M = Mma<T>;
  constexpr int MT = C::MT, BK = C::BK, BQ = C::BQ, CK = C::CK, DVB = C::DVB, THREADS = C::THREADS;
  constexpr int LDF = C::LDF, LDV = C::LDV, NT = BK / 8, DT = DVB / 8, KS = CK / M::K;
  const AttnParams& p = prm.a;

  ARMFAST_DYNAMIC_SMEM(smem);
  T* fq = reinterpret_cast<T*>(smem + C::FQ);
  T* fk = reinterpret_cast<T*>(smem + C::FK);
  T* vs = reinterpret_cast<T*>(smem + C::V);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // blockIdx.x = (b * value_blocks + value block) * n_tiles + query tile
  const int tile = blockIdx.x % p.n_tiles;
  const int64_t rest = blockIdx.x / p.n_tiles, b = rest / prm.value_blocks;
  const int col0 = static_cast<int>(rest % prm.value_blocks) * DVB;  // first value column of the block
  const int n = prm.n, q0 = tile * BQ, nq = std::min(BQ, n - q0), wrow = warp * MT * 16;
  const int value_width = prm.H * prm.d;
  const T* fb = static_cast<const T*>(prm.f) + b * prm.sf[0];
  const T* vb = static_cast<const T*>(p.v) + b * p.sv[0];
  const float* rn = prm.rnorm + b * n;
  const float thresh = prm.thresh[b];

  float rq[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = q0 + wrow + 16 * mt + mma::c_row(lane, 2 * half);
      rq[mt][half] = row < n ? rn[row] : 0.0f;
    }
  float acc[MT][DT][4], row_max[MT][2], row_sum[MT][2];
  zero(acc);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

  for (int k0 = 0; k0 < n; k0 += BK) {
    const int nk = std::min(BK, n - k0);
    float s[MT][NT][4];
    zero(s);
    for (int c0 = 0; c0 < prm.C; c0 += CK) {  // S = F_q F_k^T, CK features at a time
      load_block<T, BQ, CK, THREADS>(fq, LDF, fb, prm.sf[1], prm.sf[2], q0, nq, c0, prm.C - c0);
      load_block<T, BK, CK, THREADS>(fk, LDF, fb, prm.sf[1], prm.sf[2], k0, nk, c0, prm.C - c0);
      __syncthreads();
      scores<T, MT, NT, KS>(s, QInSharedMemory<T>{fq + wrow * LDF, LDF}, fk, LDF);
      __syncthreads();  // before the next chunk overwrites fq, fk
    }
    // V columns col0 .. col0 + DVB of [n, H * d]: head c / d, column c % d
    for (int idx = threadIdx.x; idx < BK * DVB; idx += THREADS) {
      const int r = idx / DVB, c = idx % DVB, col = col0 + c;
      vs[r * LDV + c] = r < nk && col < value_width
                            ? vb[(col / prm.d) * p.sv[1] + (k0 + r) * p.sv[2] + (col % prm.d) * p.sv[3]]
                            : from_float<T>(0.0f);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = q0 + wrow + 16 * mt + mma::c_row(lane, e), col = k0 + 8 * nt + mma::c_col(lane, e);
          const float cosine = s[mt][nt][e] * rq[mt][e >> 1] * (col < n ? rn[col] : 0.0f);
          const bool keep = col < n && (cosine >= thresh || row == col);  // the diagonal always stays
          s[mt][nt][e] = keep ? cosine : -INFINITY;
        }
    __syncthreads();  // the V tile is in place
    online_softmax(s, row_max, row_sum, acc, prm.gamma_log2);
    accumulate_pv<T>(acc, s, vs, LDV);
    __syncthreads();  // every warp is done with the V tile
  }

  // the diagonal is never masked, so every stored row has l >= 1
  T* out = static_cast<T*>(p.out) + b * p.so[0];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = q0 + wrow + 16 * mt + mma::c_row(lane, 2 * half);
      const float inv = 1.0f / quad_sum(row_sum[mt][half]);
      if (row >= n) continue;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const int col = col0 + 8 * dt + mma::c_col(lane, e);
          if (col < value_width)
            out[(col / prm.d) * p.so[1] + row * p.so[2] + (col % prm.d) * p.so[3]] = from_float<T>(acc[mt][dt][e] * inv);
        }
    }
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

// f [B, n, C]; rnorm [B, n], thresh [B]: float32, contiguous (the first pass); v, out [B, H, n, d].
template <typename T, class Launcher>
void masked_affinity(const AffinityShape& s, const Strided& f, const float* rnorm, const float* thresh,
                     const Strided& v, const Strided& out, float gamma, const DeviceLimits& dev, Launcher&& launch) {
  using C = AffinityConfig<T>;
  if (s.n > 0x7fffffff || s.C > 0x7fffffff || s.H * s.d > 0x7fffffff)
    throw std::invalid_argument("armfast CUDA masked affinity attention: sizes too large");
  check_smem<C>("masked affinity", static_cast<int>(s.d), dev);
  Params prm{};
  AttnParams& p = prm.a;
  p.v = v.data, p.out = out.data;
  copy_strides(p.sv, v, 4), copy_strides(p.so, out, 4);
  prm.f = f.data;
  copy_strides(prm.sf, f, 3);
  prm.rnorm = rnorm, prm.thresh = thresh;
  prm.n = static_cast<int>(s.n), prm.C = static_cast<int>(s.C), prm.H = static_cast<int>(s.H);
  prm.d = static_cast<int>(s.d);
  prm.value_blocks = ceil_div_int(prm.H * prm.d, C::DVB);
  prm.gamma_log2 = gamma * kLog2e;
  p.n_tiles = ceil_div_int(prm.n, C::BQ);
  launch(masked_affinity_fwd_kernel<C>, kernel_name<C>("masked_affinity_fwd_kernel"),
         s.B * prm.value_blocks * p.n_tiles, C::THREADS, C::SMEM, prm);
}

}  // namespace armfast::cuda::baseline
