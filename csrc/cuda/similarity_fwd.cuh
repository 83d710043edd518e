// Forward kernels of SC-CLIP's similarity patterns on tensor cores (sm_80 and newer), after the
// masked affinity kernel of baseline_fwd.cuh and written against Mma<T> of armfast/warp_mma.cuh.
// Both start from the cosines S_ij = <f_i, f_j> r_i r_j of the features F [B, N, C] (r: inverse
// row norms of a first pass), computed per (query tile, key tile) from the dot products of F in
// CK-wide feature chunks; no N x N matrix exists anywhere.
//
// similarity_aggregation_fwd_kernel: out = W X / (rowsum(W) + 1e-6), W = S [S >= threshold]. No
//   softmax: each key tile adds W X to the accumulators and W's row sums to `w_sum` (saved as
//   rowsum [B, N]). A block owns BQ query rows and DVB columns of X [B, N, D], so S is
//   recomputed once per DVB columns.
// averaged_dual_softmax_fwd_kernel: out = ((P_mask + P_kk) / 2) V per head, with
//   P_mask = softmax(A), A = gamma (S - thresh) masked where A < 0 off the diagonal (thresh =
//   beta mean S of the image, from the first pass), P_kk = softmax(scale K K^T). A block owns
//   BQ query rows of one (batch, head): two online-softmax states and two accumulators per warp
//   (at d = 128 two warps per 16 rows, half of the columns each),
//   each K / V tile loaded once (cp.async) for both; the row log-sum-exps of both softmaxes are
//   saved (lse_mask, lse_kk [B, H, N]). S is recomputed per head.
//
// Discrete decisions in float32 whatever the dtype: 16-bit products of F are exact in the fp32
// accumulators; for float32 (TF32 tensor cores) S is taken as 3xTF32, F = hi + lo with
// hi = tf32(F), S = hi hi^T + hi lo^T + lo hi^T, float32-accurate, where one TF32 product
// would move S by ~1e-3 and flip entries near the threshold.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "baseline_fwd.cuh"

namespace armfast::cuda::similarity {

using baseline::check_smem;
using baseline::kernel_name;
using baseline::load_block;
using flash::accumulate_pv;
using flash::ceil_div_int;
using flash::kPad;
using flash::online_softmax;
using flash::QInRegisters;
using flash::QInSharedMemory;
using flash::scores;
using flash::zero;

constexpr float kRowEps = 1e-6f;  // added to rowsum(W) before dividing, as SC-CLIP does

struct Params {
  const void* f;  // [B, N, C]
  int64_t sf[3];
  const float *rnorm, *thresh;  // [B, N] and, for the dual softmax, [B]: contiguous float32
  // aggregation: x [B, N, D] and out [B, N, D] through sv[0..2] and so[0..2];
  // dual softmax: k, v, out [B, H, N, d]
  const void *k, *v;
  void* out;
  int64_t sk[4], sv[4], so[4];
  float *stat0, *stat1;  // aggregation: rowsum [B, N]; dual softmax: lse_mask, lse_kk [B, H, N]
  int N, C, H, D, value_blocks, n_tiles;
  float threshold, gamma, scale, scale_log2;
  bool vec_k, vec_v, vec_o;
};

// The shared-memory tiles of F for S, and how S is multiplied: 16-bit types in one product,
// float32 as 3xTF32 (SPLIT) from a hi and a lo copy of each tile.
template <typename T, int BQ_, int BK_, int CK_>
struct FeatureTiles {
  static constexpr bool SPLIT = std::is_same_v<T, float>;
  static constexpr int BQ = BQ_, BK = BK_, CK = CK_, LDF = CK + kPad, COPIES = SPLIT ? 2 : 1;
  static constexpr size_t BYTES = sizeof(T) * COPIES * (BQ + BK) * LDF;
  static_assert(CK % 16 == 0, "feature chunks are whole k steps");
};

// dst (and, SPLIT, its lo copy ROWS * ldf further) = F rows row0.. and feature columns col0.. of
// one image, zero past nrows / ncols; SPLIT stores hi = tf32(x) and lo = x - hi.
template <typename T, bool SPLIT, int ROWS, int CK, int THREADS>
__device__ __forceinline__ void load_features(T* dst, int ldf, const T* src, int64_t rs, int64_t cs, int row0,
                                              int nrows, int col0, int ncols) {
  if constexpr (!SPLIT) {
    load_block<T, ROWS, CK, THREADS>(dst, ldf, src, rs, cs, row0, nrows, col0, ncols);
  } else {
    for (int idx = threadIdx.x; idx < ROWS * CK; idx += THREADS) {
      const int r = idx / CK, c = idx % CK;
      const float x = r < nrows && c < ncols ? src[(row0 + r) * rs + static_cast<int64_t>(col0 + c) * cs] : 0.0f;
      const uint32_t bits = to_tf32(x);
      float hi;
      __builtin_memcpy(&hi, &bits, 4);
      dst[r * ldf + c] = hi;
      dst[ROWS * ldf + r * ldf + c] = x - hi;
    }
  }
}

// The inverse row norms of the lane's two rows per m16 tile (0 past N).
template <int MT>
__device__ __forceinline__ void query_rnorms(float (&rq)[MT][2], const float* rn, int row0, int n) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + 16 * mt + mma::c_row(lane, 2 * half);
      rq[mt][half] = row < n ? rn[row] : 0.0f;
    }
}

// s = S of the warp's rows (query rows q0.., key rows k0.. of image fb; 0 for keys past N): the
// dot products F_q F_k^T over C in CK chunks staged in fq / fk (each COPIES x [rows][LDF]), times
// the inverse row norms rq (the lane's rows) and rn (the image's). Leaves the block synchronised.
template <class FT, typename T, int MT, int NT, int THREADS>
__device__ __forceinline__ void cosines(float (&s)[MT][NT][4], const Params& prm, const T* fb, T* fq, T* fk,
                                        const float (&rq)[MT][2], const float* rn, int q0, int nq, int k0, int nk,
                                        int wrow) {
  constexpr int KS = FT::CK / Mma<T>::K, LDF = FT::LDF;
  zero(s);
  for (int c0 = 0; c0 < prm.C; c0 += FT::CK) {
    load_features<T, FT::SPLIT, FT::BQ, FT::CK, THREADS>(fq, LDF, fb, prm.sf[1], prm.sf[2], q0, nq, c0, prm.C - c0);
    load_features<T, FT::SPLIT, FT::BK, FT::CK, THREADS>(fk, LDF, fb, prm.sf[1], prm.sf[2], k0, nk, c0, prm.C - c0);
    __syncthreads();
    const QInSharedMemory<T> q_hi{fq + wrow * LDF, LDF};
    scores<T, MT, NT, KS>(s, q_hi, fk, LDF);
    if constexpr (FT::SPLIT) {
      const T* fk_lo = fk + FT::BK * LDF;
      scores<T, MT, NT, KS>(s, q_hi, fk_lo, LDF);
      scores<T, MT, NT, KS>(s, QInSharedMemory<T>{fq + FT::BQ * LDF + wrow * LDF, LDF}, fk, LDF);
    }
    __syncthreads();  // before the next chunk overwrites fq, fk
  }
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * nt + mma::c_col(lane, e);
        s[mt][nt][e] *= rq[mt][e >> 1] * (col < nk ? rn[k0 + col] : 0.0f);
      }
}

// ---- thresholded similarity aggregation ---------------------------------------------------------

template <typename T>
struct AggregationConfig {
  using Elem = T;
  static constexpr int WARPS = 4, MT = 1, BK = 64, DVB = 128;  // DVB: columns of X per block
  static constexpr int THREADS = 32 * WARPS, BQ = 16 * MT * WARPS, LDV = DVB + kPad;
  using Features = FeatureTiles<T, BQ, BK, std::is_same_v<T, float> ? 32 : 64>;
  static constexpr size_t FQ = 0;                                    // COPIES x [BQ][LDF]
  static constexpr size_t FK = FQ + sizeof(T) * Features::COPIES * BQ * Features::LDF;  // COPIES x [BK][LDF]
  static constexpr size_t X = FQ + Features::BYTES;                  // [BK][LDV]
  static constexpr size_t SMEM = X + sizeof(T) * BK * LDV;
};

template <class C>
__global__ void __launch_bounds__(C::THREADS) similarity_aggregation_fwd_kernel(const Params prm) {
  using T = typename C::Elem;
  constexpr int MT = C::MT, BK = C::BK, BQ = C::BQ, DVB = C::DVB, THREADS = C::THREADS, LDV = C::LDV;
  constexpr int NT = BK / 8, DT = DVB / 8;

  ARMFAST_DYNAMIC_SMEM(smem);
  T* fq = reinterpret_cast<T*>(smem + C::FQ);
  T* fk = reinterpret_cast<T*>(smem + C::FK);
  T* xs = reinterpret_cast<T*>(smem + C::X);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // blockIdx.x = (b * value_blocks + value block) * n_tiles + query tile
  const int tile = blockIdx.x % prm.n_tiles;
  const int64_t rest = blockIdx.x / prm.n_tiles, b = rest / prm.value_blocks;
  const int col0 = static_cast<int>(rest % prm.value_blocks) * DVB;  // first column of X of the block
  const int n = prm.N, q0 = tile * BQ, nq = std::min(BQ, n - q0), wrow = warp * MT * 16;
  const T* fb = static_cast<const T*>(prm.f) + b * prm.sf[0];
  const T* xb = static_cast<const T*>(prm.v) + b * prm.sv[0];
  const float* rn = prm.rnorm + b * n;

  float rq[MT][2];
  query_rnorms(rq, rn, q0 + wrow, n);
  float acc[MT][DT][4], w_sum[MT][2];  // w_sum: this lane's share of rowsum(W), the saved statistic
  zero(acc);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) w_sum[mt][0] = w_sum[mt][1] = 0.0f;

  for (int k0 = 0; k0 < n; k0 += BK) {
    const int nk = std::min(BK, n - k0);
    float s[MT][NT][4];
    cosines<typename C::Features, T, MT, NT, THREADS>(s, prm, fb, fq, fk, rq, rn, q0, nq, k0, nk, wrow);
    load_block<T, BK, DVB, THREADS>(xs, LDV, xb, prm.sv[1], prm.sv[2], k0, nk, col0, prm.D - col0);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // W, decided in fp32; keys past N have S = 0, so W = 0 there whatever the threshold
          const float w = s[mt][nt][e] >= prm.threshold ? s[mt][nt][e] : 0.0f;
          s[mt][nt][e] = w;
          w_sum[mt][e >> 1] += w;
        }
    __syncthreads();  // the X tile is in place
    accumulate_pv<T>(acc, s, xs, LDV);
    __syncthreads();  // every warp is done with the X tile
  }

  T* out = static_cast<T*>(prm.out) + b * prm.so[0];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = q0 + wrow + 16 * mt + mma::c_row(lane, 2 * half);
      const float sum = quad_sum(w_sum[mt][half]);
      if (row >= n) continue;
      if (col0 == 0 && mma::lane_quad(lane) == 0) prm.stat0[b * n + row] = sum;
      const float inv = 1.0f / (sum + kRowEps);
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const int col = col0 + 8 * dt + mma::c_col(lane, e);
          if (col < prm.D) out[row * prm.so[1] + col * prm.so[2]] = from_float<T>(acc[mt][dt][e] * inv);
        }
    }
}

// ---- averaged dual softmax ------------------------------------------------------------------------

template <typename T, int D_>
struct DualConfig {
  using Elem = T;
  static constexpr int D = D_, MT = 1;
  // At d = 128 two warps share each 16 query rows, one half of the columns of both accumulators
  // each (they compute the same scores): two full 16 x 128 accumulators would spill.
  static constexpr int COL_SPLIT = D == 128 ? 2 : 1, WARPS = 4 * COL_SPLIT;
  // 32-key tiles where two accumulators of d = 128 or TF32 operands would crowd the registers
  static constexpr int BK = (D == 128 || std::is_same_v<T, float>) ? 32 : 64;
  static constexpr int THREADS = 32 * WARPS, BQ = 16 * MT * WARPS / COL_SPLIT, LD = D + kPad;
  // K's query-row fragments stay in registers up to d = 64; at d = 128 they are reread from
  // shared memory per key tile
  static constexpr bool Q_IN_REGISTERS = D <= 64;
  using Features = FeatureTiles<T, BQ, BK, std::is_same_v<T, float> ? 32 : 64>;
  static constexpr size_t KQ = 0;                            // [BQ][LD]: K's rows of the query tile
  static constexpr size_t K = KQ + sizeof(T) * BQ * LD;      // [BK][LD]
  static constexpr size_t V = K + sizeof(T) * BK * LD;       // [BK][LD]
  static constexpr size_t FQ = V + sizeof(T) * BK * LD;      // COPIES x [BQ][LDF]
  static constexpr size_t FK = FQ + sizeof(T) * Features::COPIES * BQ * Features::LDF;  // COPIES x [BK][LDF]
  static constexpr size_t SMEM = FQ + Features::BYTES;
  static_assert(D % 16 == 0 && BK % 16 == 0, "tiles are whole 16 x 16 blocks");
};

template <class C>
__global__ void __launch_bounds__(C::THREADS) averaged_dual_softmax_fwd_kernel(const Params prm) {
  using T = typename C::Elem;
  using M = Mma<T>;
  constexpr int D = C::D, MT = C::MT, BK = C::BK, BQ = C::BQ, LD = C::LD, THREADS = C::THREADS;
  constexpr int KS = D / M::K, NT = BK / 8, DC = D / C::COL_SPLIT, DT = DC / 8;  // DC: the warp's columns
  constexpr bool QREG = C::Q_IN_REGISTERS;

  ARMFAST_DYNAMIC_SMEM(smem);
  T* kq = reinterpret_cast<T*>(smem + C::KQ);
  T* ks = reinterpret_cast<T*>(smem + C::K);
  T* vs = reinterpret_cast<T*>(smem + C::V);
  T* fq = reinterpret_cast<T*>(smem + C::FQ);
  T* fk = reinterpret_cast<T*>(smem + C::FK);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // blockIdx.x = (b * H + h) * n_tiles + query tile
  const int tile = blockIdx.x % prm.n_tiles;
  const int64_t bh = blockIdx.x / prm.n_tiles, b = bh / prm.H, h = bh % prm.H;
  const int n = prm.N, q0 = tile * BQ, nq = std::min(BQ, n - q0);
  const int wrow = warp / C::COL_SPLIT * MT * 16, wcol = warp % C::COL_SPLIT * DC;  // the warp's rows, columns
  const T* fb = static_cast<const T*>(prm.f) + b * prm.sf[0];
  const T* kg = static_cast<const T*>(prm.k) + b * prm.sk[0] + h * prm.sk[1];
  const T* vg = static_cast<const T*>(prm.v) + b * prm.sv[0] + h * prm.sv[1];
  const float* rn = prm.rnorm + b * n;
  const float thresh = prm.thresh[b];

  flash::load_rows<T, BQ, D, THREADS>(kq, LD, kg, prm.sk[2], prm.sk[3], q0, nq, prm.vec_k);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[MT][QREG ? KS : 1][4];
  if constexpr (QREG) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) M::load_a(qf[mt][kk], kq + (wrow + 16 * mt) * LD + kk * M::K, LD);
  }

  float rq[MT][2];
  query_rnorms(rq, rn, q0 + wrow, n);
  // softmax 0: P_mask (raw scores A, natural units), softmax 1: P_kk (raw scores K K^T)
  float acc[2][MT][DT][4], row_max[2][MT][2], row_sum[2][MT][2];
#pragma unroll
  for (int o = 0; o < 2; ++o) {
    zero(acc[o]);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      row_max[o][mt][0] = row_max[o][mt][1] = -INFINITY;
      row_sum[o][mt][0] = row_sum[o][mt][1] = 0.0f;
    }
  }

  for (int k0 = 0; k0 < n; k0 += BK) {
    const int nk = std::min(BK, n - k0);
    // K and V tiles in flight while S is computed
    flash::load_rows<T, BK, D, THREADS>(ks, LD, kg, prm.sk[2], prm.sk[3], k0, nk, prm.vec_k);
    flash::load_rows<T, BK, D, THREADS>(vs, LD, vg, prm.sv[2], prm.sv[3], k0, nk, prm.vec_v);
    cp_async_commit();
    float s[MT][NT][4];
    cosines<typename C::Features, T, MT, NT, THREADS>(s, prm, fb, fq, fk, rq, rn, q0, nq, k0, nk, wrow);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = q0 + wrow + 16 * mt + mma::c_row(lane, e), col = k0 + 8 * nt + mma::c_col(lane, e);
          const float a = prm.gamma * (s[mt][nt][e] - thresh);  // decided in fp32; the diagonal always stays
          s[mt][nt][e] = col < n && (a >= 0.0f || row == col) ? a : -INFINITY;
        }
    cp_async_wait<0>();
    __syncthreads();  // the K and V tiles are in place
    online_softmax(s, row_max[0], row_sum[0], acc[0], kLog2e);
    accumulate_pv<T>(acc[0], s, vs + wcol, LD);

    zero(s);
    if constexpr (QREG) {
      scores<T, MT, NT, KS>(s, QInRegisters<MT, KS>{qf}, ks, LD);
    } else {
      scores<T, MT, NT, KS>(s, QInSharedMemory<T>{kq + wrow * LD, LD}, ks, LD);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (8 * nt + mma::c_col(lane, e) >= nk) s[mt][nt][e] = -INFINITY;  // keys past N
    online_softmax(s, row_max[1], row_sum[1], acc[1], prm.scale_log2);
    accumulate_pv<T>(acc[1], s, vs + wcol, LD);  // the same V tile
    __syncthreads();  // every warp is done with the K and V tiles
  }

  // out = (acc_mask / l_mask + acc_kk / l_kk) / 2 in acc[0]; the saved statistics are both lse.
  // The diagonal is never masked, so l >= 1 on every stored row.
  float ones[MT][2];
  const int64_t stat_row0 = bh * n;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      ones[mt][half] = 1.0f;
      const int row = q0 + wrow + 16 * mt + mma::c_row(lane, 2 * half);
      const float sum_mask = quad_sum(row_sum[0][mt][half]), sum_kk = quad_sum(row_sum[1][mt][half]);
      if (wcol == 0 && mma::lane_quad(lane) == 0 && row < n) {
        prm.stat0[stat_row0 + row] = row_max[0][mt][half] + log2f(sum_mask) * kLn2;
        prm.stat1[stat_row0 + row] = row_max[1][mt][half] * prm.scale + log2f(sum_kk) * kLn2;
      }
      const float inv_mask = row < n ? 0.5f / sum_mask : 0.0f, inv_kk = row < n ? 0.5f / sum_kk : 0.0f;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e)
          acc[0][mt][dt][e] = acc[0][mt][dt][e] * inv_mask + acc[1][mt][dt][e] * inv_kk;
    }
  T* og = static_cast<T*>(prm.out) + b * prm.so[0] + h * prm.so[1] + wcol * prm.so[3];
  // the warp's own rows and columns of kq are free now: the loop is done (its last barrier passed)
  flash::store_acc_rows<T, MT, DT>(acc[0], ones, kq + wrow * LD + wcol, LD, og, prm.so[2], prm.so[3], q0 + wrow, n,
                                   prm.vec_o);
}

// ---- host side: parameters and launches (the launcher runs them: on the GPU, or in the tests'
// emulator) ------------------------------------------------------------------------------------------

inline void check_sizes(const char* what, int64_t n, int64_t C, int64_t width) {
  if (n > 0x7fffffff || C > 0x7fffffff || width > 0x7fffffff)
    throw std::invalid_argument(std::string("armfast CUDA ") + what + ": sizes too large");
}

// f [B, N, C]; rnorm [B, N] (float32, contiguous, the first pass); x, out [B, N, D]; rowsum [B, N]
// float32 contiguous, written.
template <typename T, class Launcher>
void similarity_aggregation(const AggregationShape& s, const Strided& f, const float* rnorm, const Strided& x,
                            const Strided& out, float* rowsum, float threshold, const DeviceLimits& dev,
                            Launcher&& launch) {
  using C = AggregationConfig<T>;
  check_sizes("similarity aggregation", s.N, s.C, s.D);
  check_smem<C>("similarity aggregation", static_cast<int>(s.D), dev);
  Params prm{};
  prm.f = f.data, prm.v = x.data, prm.out = out.data;
  copy_strides(prm.sf, f, 3), copy_strides(prm.sv, x, 3), copy_strides(prm.so, out, 3);
  prm.rnorm = rnorm, prm.stat0 = rowsum;
  prm.N = static_cast<int>(s.N), prm.C = static_cast<int>(s.C), prm.D = static_cast<int>(s.D);
  prm.value_blocks = ceil_div_int(prm.D, C::DVB);
  prm.n_tiles = ceil_div_int(prm.N, C::BQ);
  prm.threshold = threshold;
  launch(similarity_aggregation_fwd_kernel<C>, kernel_name<C>("similarity_aggregation_fwd_kernel"),
         s.B * prm.value_blocks * prm.n_tiles, C::THREADS, C::SMEM, prm);
}

// f [B, N, C]; rnorm [B, N] and thresh [B] = beta mean(S) (float32, contiguous, the first pass);
// k, v, out [B, H, N, d]; lse_mask, lse_kk [B, H, N] float32 contiguous, written.
template <typename T, class Launcher>
void averaged_dual_softmax(const DualSoftmaxShape& s, const Strided& f, const float* rnorm, const float* thresh,
                           const Strided& k, const Strided& v, const Strided& out, float* lse_mask, float* lse_kk,
                           float scale, float gamma, const DeviceLimits& dev, Launcher&& launch) {
  check_sizes("averaged dual softmax", s.N, s.C, s.H * s.d);
  Params prm{};
  prm.f = f.data, prm.k = k.data, prm.v = v.data, prm.out = out.data;
  copy_strides(prm.sf, f, 3), copy_strides(prm.sk, k, 4), copy_strides(prm.sv, v, 4), copy_strides(prm.so, out, 4);
  prm.vec_k = vec_ok<T>(k), prm.vec_v = vec_ok<T>(v), prm.vec_o = vec_ok<T>(out);
  prm.rnorm = rnorm, prm.thresh = thresh, prm.stat0 = lse_mask, prm.stat1 = lse_kk;
  prm.N = static_cast<int>(s.N), prm.C = static_cast<int>(s.C), prm.H = static_cast<int>(s.H);
  prm.D = static_cast<int>(s.d);
  prm.gamma = gamma, prm.scale = scale, prm.scale_log2 = scale * kLog2e;
  with_head_dim(s.d, [&](auto dim) {
    using C = DualConfig<T, decltype(dim)::value>;
    check_smem<C>("averaged dual softmax", C::D, dev);
    prm.n_tiles = ceil_div_int(prm.N, C::BQ);
    launch(averaged_dual_softmax_fwd_kernel<C>, kernel_name<C>("averaged_dual_softmax_fwd_kernel"),
           s.B * s.H * prm.n_tiles, C::THREADS, C::SMEM, prm);
  });
}

}  // namespace armfast::cuda::similarity
