// The GEMMs of patch_text_logits: out(m, n) = epilogue(sum_k A(m, k) B(k, n)) with A and B read
// through index maps (strided and transposed views of x, text and dout need no copy), an optional
// per-k scale of B, and the normalisation scales and logit_scale in the epilogue.
//   gemm_tc_kernel   tensor cores (Mma<T>: float16 / bfloat16, float32 on TF32), 64 x 64 tiles
//   gemm_fma_kernel  exact fp32 FMA, 64 x 64 tiles
// Both split K over gridDim.z when asked (the long reduction over all B*N rows of dtext): each split
// writes its raw sums to `partial`, and splitk_reduce_kernel adds them in a fixed order and applies
// the epilogue, so the result is bitwise reproducible.
#pragma once

#include <algorithm>
#include <cstdint>

#include "armfast/warp_mma.cuh"

namespace armfast::cuda::logits {

// Offset of logical index i along one dim. x's row index r = b*N + n needs two strides:
// (r / n_inner) * s_outer + (r % n_inner) * s_inner; n_inner = 0 means a plain i * s_inner.
struct Index {
  int64_t n_inner, s_outer, s_inner;
  __host__ __device__ __forceinline__ int64_t operator()(int64_t i) const {
    return n_inner ? (i / n_inner) * s_outer + (i % n_inner) * s_inner : i * s_inner;
  }
  // Every offset is a multiple of `e` (so 16-byte chunks along another dim stay aligned).
  bool multiple_of(int64_t e) const { return s_outer % e == 0 && s_inner % e == 0; }
  bool unit() const { return n_inner == 0 && s_inner == 1; }
};

inline Index plain(int64_t stride) { return Index{0, 0, stride}; }

template <typename TIn, typename TOut>
struct GemmArgs {
  const TIn* a;
  Index a_row, a_col;  // A(m, k) = a[a_row(m) + a_col(k)]
  const TIn* b;
  Index b_row, b_col;  // B(k, n) = b[b_row(k) + b_col(n)]
  const float* kscale;                    // B(k, n) *= kscale[k], or null
  const float *mscale, *nscale, *sscale;  // out *= mscale[m] * nscale[n] * sscale[0], or null
  TOut* out;
  Index o_row;  // out(m, n) = out[o_row(m) + n * o_col]
  int64_t o_col;
  int64_t M, N, K;
  int64_t k_split;  // K per split (gridDim.z splits); a multiple of every kernel's k tile
  float* partial;   // more than one split: raw sums [split][M][N], epilogue in splitk_reduce_kernel
  bool vec_a, vec_b;  // 16-byte loads along the contiguous dim of A / B (tensor-core kernel)
};

// K per split for `splits` splits: whole 32-wide k tiles (a multiple of both kernels' k tiles).
inline int64_t k_per_split(int64_t K, int64_t splits) {
  const int64_t per = (K + splits - 1) / splits;
  return splits > 1 ? (per + 31) / 32 * 32 : K;
}

template <typename TIn, typename TOut>
__device__ __forceinline__ float gemm_scale(const GemmArgs<TIn, TOut>& g, int64_t m, int64_t n) {
  return (g.sscale ? g.sscale[0] : 1.0f) * (g.mscale ? g.mscale[m] : 1.0f) * (g.nscale ? g.nscale[n] : 1.0f);
}

// Element (m, n) of this block's split: a raw partial sum, or the finished output.
template <typename TIn, typename TOut>
__device__ __forceinline__ void gemm_store(const GemmArgs<TIn, TOut>& g, int64_t m, int64_t n, float acc) {
  if (m >= g.M || n >= g.N) return;
  if (gridDim.z > 1) {
    g.partial[(blockIdx.z * g.M + m) * g.N + n] = acc;
  } else {
    g.out[g.o_row(m) + n * g.o_col] = from_float<TOut>(acc * gemm_scale(g, m, n));
  }
}

template <typename TIn, typename TOut>
__global__ void __launch_bounds__(256) splitk_reduce_kernel(const GemmArgs<TIn, TOut> g, int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (i >= g.M * g.N) return;
  const int64_t m = i / g.N, n = i % g.N;
  float acc = 0.0f;
  for (int s = 0; s < splits; ++s) acc += g.partial[s * g.M * g.N + i];
  g.out[g.o_row(m) + n * g.o_col] = from_float<TOut>(acc * gemm_scale(g, m, n));
}

// ---- exact fp32 GEMM (FMA) ----------------------------------------------------------------------
constexpr int kBM = 64, kBN = 64, kBK = 16, kGemmThreads = 256;

// Each block computes a 64 x 64 output tile; thread (ty, tx) of a 16 x 16 grid owns rows
// ty + 16i and columns tx + 16j. A is staged transposed so both operands are read as rows.
template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kGemmThreads) gemm_fma_kernel(const GemmArgs<TIn, TOut> g) {
  // Staging: consecutive threads walk k in A and n in B; each thread loads kLoads elements of each,
  // A(mm_a + l * kStepA, kk_a) and B(kk_b + l * kStepB, nn_b) for l < kLoads.
  constexpr int kLoads = kBM * kBK / kGemmThreads, kStepA = kGemmThreads / kBK, kStepB = kGemmThreads / kBN;
  static_assert(kBM == kBN && kGemmThreads % kBK == 0 && kGemmThreads % kBN == 0,
                "the A and B tiles split evenly over the threads");
  __shared__ float as[kBK][kBM + 1];
  __shared__ float bs[kBK][kBN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int mm_a = threadIdx.x / kBK, kk_a = threadIdx.x % kBK;
  const int kk_b = threadIdx.x / kBN, nn_b = threadIdx.x % kBN;

  // The rows of A and the column of B a thread stages are the same for every k0: their offsets
  // (x's rows b*N + n cost a 64-bit division and modulo) are computed once, outside the K loop.
  int64_t a_off[kLoads];
  bool a_ok[kLoads];
#pragma unroll
  for (int l = 0; l < kLoads; ++l) {
    const int64_t m = m0 + mm_a + l * kStepA;
    a_ok[l] = m < g.M;
    a_off[l] = a_ok[l] ? g.a_row(m) : 0;
  }
  const bool b_ok = n0 + nn_b < g.N;
  const int64_t b_off = b_ok ? g.b_col(n0 + nn_b) : 0;

  float acc[4][4] = {};
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * g.k_split, k_end = std::min(g.K, k_begin + g.k_split);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    const int64_t ka = k0 + kk_a;
    const bool ka_ok = ka < k_end;
    const int64_t a_col = ka_ok ? g.a_col(ka) : 0;
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      as[kk_a][mm_a + l * kStepA] = (a_ok[l] && ka_ok) ? to_float(g.a[a_off[l] + a_col]) : 0.0f;
      const int kk = kk_b + l * kStepB;
      const int64_t k = k0 + kk;
      float val = 0.0f;
      if (b_ok && k < k_end) {
        val = to_float(g.b[g.b_row(k) + b_off]);
        if (g.kscale) val *= g.kscale[k];
      }
      bs[kk][nn_b] = val;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) gemm_store(g, m0 + ty + 16 * i, n0 + tx + 16 * j, acc[i][j]);
}


// ---- tensor cores -------------------------------------------------------------------------------
// A_MK: A is staged [m][k] (its k is the contiguous dim), else [k][m]; B_NK: B is staged [n][k],
// else [k][n]. 4 warps in 2 x 2, each owning a 32 x 32 output block (2 m16 x 4 n8 tiles).
template <typename T, bool A_MK, bool B_NK>
struct TcGemm {
  static constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;
  static constexpr int A_ROWS = A_MK ? BM : BK, LDA = (A_MK ? BK : BM) + 8;
  static constexpr int B_ROWS = B_NK ? BN : BK, LDB = (B_NK ? BK : BN) + 8;
  static constexpr size_t SMEM = sizeof(T) * (A_ROWS * LDA + B_ROWS * LDB);
};

// dst[r][c] = src(r0 + r, c0 + c) for r < ROWS, c < COLS (zero outside [0, R) x [0, C)), with
// src(r, c) = p[row(r) + col(c)] times rscale[r] (when given); c is the contiguous dim when vec.
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void stage_tile(T* dst, int ld, const T* p, const Index& row, const Index& col, int64_t r0,
                                           int64_t R, int64_t c0, int64_t C, const float* rscale, bool vec) {
  constexpr int PER = 16 / sizeof(T), CHUNKS = COLS / PER;
  for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += THREADS) {
    const int r = idx / CHUNKS, c = (idx % CHUNKS) * PER;
    const int64_t gr = r0 + r, gc = c0 + c;
    T vals[PER];
    if (vec && gr < R && gc + PER <= C) {
      *reinterpret_cast<uint4*>(vals) = *reinterpret_cast<const uint4*>(p + row(gr) + gc);
    } else {
#pragma unroll
      for (int e = 0; e < PER; ++e) vals[e] = (gr < R && gc + e < C) ? p[row(gr) + col(gc + e)] : from_float<T>(0.0f);
    }
    if (rscale != nullptr && gr < R) {
      const float f = rscale[gr];
#pragma unroll
      for (int e = 0; e < PER; ++e) vals[e] = from_float<T>(to_float(vals[e]) * f);
    }
    *reinterpret_cast<uint4*>(dst + r * ld + c) = *reinterpret_cast<const uint4*>(vals);
  }
}

// 16-byte loads along the staged tiles' contiguous dim: unit stride there, the other offsets and
// the base 16-byte aligned.
template <bool A_MK, bool B_NK, typename T, typename TOut>
void set_vector_loads(GemmArgs<T, TOut>& g) {
  constexpr int64_t e = 16 / sizeof(T);
  auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  g.vec_a = aligned(g.a) && (A_MK ? g.a_col.unit() && g.a_row.multiple_of(e) : g.a_row.unit() && g.a_col.multiple_of(e));
  g.vec_b = aligned(g.b) && (B_NK ? g.b_row.unit() && g.b_col.multiple_of(e) : g.b_col.unit() && g.b_row.multiple_of(e));
}

template <typename T, typename TOut, bool A_MK, bool B_NK>
__global__ void __launch_bounds__(128) gemm_tc_kernel(const GemmArgs<T, TOut> g) {
  using C = TcGemm<T, A_MK, B_NK>;
  using M = Mma<T>;
  ARMFAST_DYNAMIC_SMEM(smem);
  T* as = reinterpret_cast<T*>(smem);
  T* bs = as + C::A_ROWS * C::LDA;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp % 2, wn = warp / 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * C::BM, n0 = static_cast<int64_t>(blockIdx.y) * C::BN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * g.k_split, k_end = std::min(g.K, k_begin + g.k_split);

  float acc[2][4][4] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += C::BK) {
    if constexpr (A_MK) {
      stage_tile<T, C::BM, C::BK, C::THREADS>(as, C::LDA, g.a, g.a_row, g.a_col, m0, g.M, k0, k_end, nullptr, g.vec_a);
    } else {
      stage_tile<T, C::BK, C::BM, C::THREADS>(as, C::LDA, g.a, g.a_col, g.a_row, k0, k_end, m0, g.M, nullptr, g.vec_a);
    }
    if constexpr (B_NK) {
      stage_tile<T, C::BN, C::BK, C::THREADS>(bs, C::LDB, g.b, g.b_col, g.b_row, n0, g.N, k0, k_end, nullptr, g.vec_b);
    } else {
      stage_tile<T, C::BK, C::BN, C::THREADS>(bs, C::LDB, g.b, g.b_row, g.b_col, k0, k_end, n0, g.N, g.kscale, g.vec_b);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < C::BK / M::K; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int mr = 32 * wm + 16 * mt;
        if constexpr (A_MK) M::load_a(a[mt], as + mr * C::LDA + kk * M::K, C::LDA);
        else M::load_a_trans(a[mt], as + kk * M::K * C::LDA + mr, C::LDA);
      }
#pragma unroll
      for (int nn = 0; nn < 2; ++nn) {
        const int nc = 32 * wn + 16 * nn;
        uint32_t b[2][2];
        if constexpr (B_NK) M::load_b(b, bs + nc * C::LDB + kk * M::K, C::LDB);
        else M::load_b_trans(b, bs + kk * M::K * C::LDB + nc, C::LDB);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_sync<T>(acc[mt][2 * nn], a[mt], b[0]);
          mma_sync<T>(acc[mt][2 * nn + 1], a[mt], b[1]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        gemm_store(g, m0 + 32 * wm + 16 * mt + mma::c_row(lane, e), n0 + 32 * wn + 8 * nt + mma::c_col(lane, e),
                   acc[mt][nt][e]);
}

}  // namespace armfast::cuda::logits
