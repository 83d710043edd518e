// Exact float32 flash attention on CUDA cores (FP32 FMA, no TF32): forward and a deterministic
// backward, head dims 32, 64, 128, any sequence lengths, strided inputs. The float32 path when
// torch does not allow TF32 for matmuls (torch.get_float32_matmul_precision() == "highest"), or
// when the TF32 tensor-core kernels do not fit the GPU's shared memory.
//
// One block of 4 warps owns a tile and streams the other operand through shared memory:
//   forward  (batch*head, query tile): online softmax over key tiles, saves lse;
//   backward (batch*head, key tile):   dK, dV, looping over query tiles;
//            (batch*head, query tile): dQ, looping over key tiles;
// so every output element is written by one block, with no atomics. Both backward kernels
// recompute P = exp(S - lse) and use delta = rowsum(dO * O) from a small pre-pass.
//
// The products go through `block_gemm` (a 16 x 8 thread grid of FP32 FMA register tiles); softmax
// statistics and accumulators are fp32 in shared memory.
//
// Each kernel has large tiles, sized for the 163 KiB of shared memory a block may use on sm_80
// (227 KiB on sm_90), and, where those exceed 99 KiB, small tiles for the GPUs that allow only
// that much (sm_86, sm_89, sm_120). Every call picks per kernel from the device's limit (see
// attention.cu, which also applies ARMFAST_CUDA_MAX_SHARED_MEMORY).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "armfast/cuda_utils.cuh"
#include "attention_entry.h"
#include "cuda_launcher.cuh"

namespace armfast::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// Pointers and element strides of one call; passed by value to each kernel.
struct Params {
  const void *q, *k, *v, *dout, *out;
  void *out_w, *dq, *dk, *dv;
  float *lse_w, *delta;
  const float* lse;
  int64_t sq[4], sk[4], sv[4], sdo[4], so[4], sdq[4], sdk[4], sdv[4], sl[3];
  int H, Nq, Nk, d;
  int64_t BH;
  int n_tiles;   // tiles along the sequence a block walks over: blockIdx.x = bh * n_tiles + tile
  float scale;
  bool vec_q, vec_k, vec_v, vec_do;  // 16-byte loads allowed (unit inner stride, aligned rows)
};

// Row padding (elements): keeps every row 16-byte aligned (uint4 stores) and shifts consecutive
// rows across shared-memory banks.
template <typename T>
constexpr int kPad = 16 / sizeof(T);
constexpr int kPadF = 4;

constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// ---- shared-memory layouts -------------------------------------------------------------------
// SMALL selects the tiles for GPUs with 99 KiB of shared memory per block (see kSmemFloor).

// Large: 64 queries x 64 keys (fp32 d=128: 64 x 32). Small: half the key tile; fp32 d=128, whose
// key tile is already at the 32 the softmax needs (one key per lane), halves the query tile.
template <typename T, int D, bool SMALL>
struct FwdCfg {
  static constexpr bool kF32 = std::is_same_v<T, float>;
  static constexpr int BQ = (SMALL && kF32 && D == 128) ? 32 : 64;
  static constexpr int BK = (SMALL || (kF32 && D == 128)) ? 32 : 64;
  static_assert(BK % 32 == 0, "the online softmax gives each lane BK / 32 keys");
  static constexpr int LDX = D + kPad<T>;   // q, k, v tiles (T)
  static constexpr int LDS = BK + kPadF;    // scores (float)
  static constexpr int LDP = BK + kPad<T>;  // probabilities (T)
  static constexpr int LDO = D + kPadF;     // output accumulator (float)
  static constexpr size_t Q = 0;
  static constexpr size_t K = align128(Q + sizeof(T) * BQ * LDX);
  static constexpr size_t V = align128(K + sizeof(T) * BK * LDX);
  static constexpr size_t S = align128(V + sizeof(T) * BK * LDX);
  static constexpr size_t P = align128(S + sizeof(float) * BQ * LDS);
  static constexpr size_t O = align128(P + sizeof(T) * BQ * LDP);
  static constexpr size_t M = align128(O + sizeof(float) * BQ * LDO);
  static constexpr size_t L = align128(M + sizeof(float) * BQ);
  static constexpr size_t BYTES = align128(L + sizeof(float) * BQ);
};

// Large: 64 keys x 32 queries (fp32 d=128: 32 x 32). Small: half the key tile.
template <typename T, int D, bool SMALL>
struct BwdKVCfg {
  static constexpr bool kF32 = std::is_same_v<T, float>;
  static constexpr int BK = ((kF32 && D == 128) ? 32 : 64) / (SMALL ? 2 : 1), BQ = 32;
  static constexpr int LDX = D + kPad<T>;   // k, v, q, dO tiles (T)
  static constexpr int LDA = D + kPadF;     // dK, dV accumulators (float)
  static constexpr int LDS = BQ + kPadF;    // S^T, dP^T (float)
  static constexpr int LDP = BQ + kPad<T>;  // P^T, dS^T (T)
  static constexpr size_t K = 0;
  static constexpr size_t V = align128(K + sizeof(T) * BK * LDX);
  static constexpr size_t Q = align128(V + sizeof(T) * BK * LDX);
  static constexpr size_t DO = align128(Q + sizeof(T) * BQ * LDX);
  static constexpr size_t DK = align128(DO + sizeof(T) * BQ * LDX);
  static constexpr size_t DV = align128(DK + sizeof(float) * BK * LDA);
  static constexpr size_t S = align128(DV + sizeof(float) * BK * LDA);
  static constexpr size_t DP = align128(S + sizeof(float) * BK * LDS);
  static constexpr size_t P = align128(DP + sizeof(float) * BK * LDS);
  static constexpr size_t DS = align128(P + sizeof(T) * BK * LDP);
  static constexpr size_t LSE = align128(DS + sizeof(T) * BK * LDP);
  static constexpr size_t DEL = align128(LSE + sizeof(float) * BQ);
  static constexpr size_t BYTES = align128(DEL + sizeof(float) * BQ);
};

// Large: 64 queries x 64 keys (fp32 d=128: 32 x 32). Small: half the query tile.
template <typename T, int D, bool SMALL>
struct BwdQCfg {
  static constexpr bool kF32 = std::is_same_v<T, float>;
  static constexpr int BK = (kF32 && D == 128) ? 32 : 64, BQ = BK / (SMALL ? 2 : 1);
  static constexpr int LDX = D + kPad<T>;   // q, dO, k, v tiles (T)
  static constexpr int LDA = D + kPadF;     // dQ accumulator (float)
  static constexpr int LDS = BK + kPadF;    // S, dP (float)
  static constexpr int LDP = BK + kPad<T>;  // dS (T)
  static constexpr size_t Q = 0;
  static constexpr size_t DO = align128(Q + sizeof(T) * BQ * LDX);
  static constexpr size_t K = align128(DO + sizeof(T) * BQ * LDX);
  static constexpr size_t V = align128(K + sizeof(T) * BK * LDX);
  static constexpr size_t DQ = align128(V + sizeof(T) * BK * LDX);
  static constexpr size_t S = align128(DQ + sizeof(float) * BQ * LDA);
  static constexpr size_t DP = align128(S + sizeof(float) * BQ * LDS);
  static constexpr size_t DS = align128(DP + sizeof(float) * BQ * LDS);
  static constexpr size_t LSE = align128(DS + sizeof(T) * BQ * LDP);
  static constexpr size_t DEL = align128(LSE + sizeof(float) * BQ);
  static constexpr size_t BYTES = align128(DEL + sizeof(float) * BQ);
};

// Shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin): 163 KiB on
// sm_80/sm_87, 227 KiB on sm_90/sm_100, and 99 KiB on sm_86/sm_89/sm_120, the least of any GPU
// this backend runs on (compute capability 8.0 or newer). The large tiles must fit sm_80, so A100
// and H100 run them; the small ones must fit 99 KiB, so every supported GPU runs the attention.
constexpr size_t kSmemSm80 = 163 * 1024;
constexpr size_t kSmemFloor = 99 * 1024;

// Small tiles are compiled only for the kernels whose large tiles exceed 99 KiB: d=64 (all three
// kernels) and d=128 (forward, dK/dV).
template <template <typename, int, bool> class Cfg, typename T, int D>
constexpr bool kHasSmall = Cfg<T, D, false>::BYTES > kSmemFloor;

template <typename T, int D>
constexpr bool fits() {
  auto ok = [](size_t large, size_t small) { return large <= kSmemSm80 && small <= kSmemFloor; };
  return ok(FwdCfg<T, D, false>::BYTES, FwdCfg<T, D, true>::BYTES) &&
         ok(BwdKVCfg<T, D, false>::BYTES, BwdKVCfg<T, D, true>::BYTES) &&
         ok(BwdQCfg<T, D, false>::BYTES, BwdQCfg<T, D, true>::BYTES);
}
static_assert(fits<float, 32>() && fits<float, 64>() && fits<float, 128>(), "smem (fp32)");

// ---- tile loads ------------------------------------------------------------------------------
// dst[r, c] = src[row0 + r, c] for r < nvalid, 0 for nvalid <= r < ROWS; src is one (batch, head)
// slice with row stride sn and column stride sd.
template <typename T, int D, int ROWS, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t sn, int64_t sd, int row0,
                                          int nvalid, bool vec) {
  if (vec) {  // sd == 1 and 16-byte aligned rows: one uint4 per thread and step
    constexpr int PER = 16 / sizeof(T), CHUNKS = D / PER;
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += kThreads) {
      const int r = idx / CHUNKS, c = (idx % CHUNKS) * PER;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < nvalid) val = *reinterpret_cast<const uint4*>(src + (row0 + r) * sn + c);
      *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * D; idx += kThreads) {
      const int r = idx / D, c = idx % D;
      dst[r * LD + c] = r < nvalid ? src[(row0 + r) * sn + c * sd] : from_float<T>(0.0f);
    }
  }
}

// ---- block-wide products ---------------------------------------------------------------------
// C[M, N] (float, ldc) = (ACC ? C : 0) + A[M, K] * op(B), A row-major (lda). B_NK: B is stored
// [N, K] (ldb) and op(B) = B^T; otherwise B is stored [K, N]. All operands in shared memory.

// FP32: a 16 x 8 thread grid, each thread owning a (M/8) x (N/16) register tile with rows
// ty + 8i and columns tx + 16j, so a warp reads 2 rows of A (broadcast) and 16 columns of B.
template <int M, int N, int K, bool B_NK, bool ACC>
__device__ __forceinline__ void block_gemm(const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  constexpr int TX = 16, TY = kThreads / TX;
  static_assert(M % TY == 0 && N % TX == 0, "tile not divisible by the thread grid");
  constexpr int RM = M / TY, RN = N / TX;
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  float acc[RM][RN];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int j = 0; j < RN; ++j) acc[i][j] = ACC ? C[(ty + i * TY) * ldc + tx + j * TX] : 0.0f;
#pragma unroll 4
  for (int k = 0; k < K; ++k) {
    float a[RM], b[RN];
#pragma unroll
    for (int i = 0; i < RM; ++i) a[i] = A[(ty + i * TY) * lda + k];
#pragma unroll
    for (int j = 0; j < RN; ++j) b[j] = B_NK ? B[(tx + j * TX) * ldb + k] : B[k * ldb + tx + j * TX];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int j = 0; j < RN; ++j) C[(ty + i * TY) * ldc + tx + j * TX] = acc[i][j];
}

// ---- forward ---------------------------------------------------------------------------------
template <typename T, int D, bool SMALL>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const Params p) {
  using C = FwdCfg<T, D, SMALL>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + C::Q);
  T* ks = reinterpret_cast<T*>(smem + C::K);
  T* vs = reinterpret_cast<T*>(smem + C::V);
  float* ss = reinterpret_cast<float*>(smem + C::S);
  T* ps = reinterpret_cast<T*>(smem + C::P);
  float* os = reinterpret_cast<float*>(smem + C::O);
  float* mrow = reinterpret_cast<float*>(smem + C::M);  // running max, in log2 units
  float* lrow = reinterpret_cast<float*>(smem + C::L);  // running sum of 2^(s - m)

  const int tile = blockIdx.x % p.n_tiles;
  const int64_t bh = blockIdx.x / p.n_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int q0 = tile * C::BQ, nq = min(C::BQ, p.Nq - q0);
  const T* qb = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* kb = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1];

  load_tile<T, D, C::BQ, C::LDX>(qs, qb, p.sq[2], p.sq[3], q0, nq, p.vec_q);
  for (int i = threadIdx.x; i < C::BQ * D; i += kThreads) os[(i / D) * C::LDO + i % D] = 0.0f;
  for (int i = threadIdx.x; i < C::BQ; i += kThreads) {
    mrow[i] = -INFINITY;
    lrow[i] = 0.0f;
  }
  const float scale_log2 = p.scale * kLog2e;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int k0 = 0; k0 < p.Nk; k0 += C::BK) {
    const int nk = min(C::BK, p.Nk - k0);
    __syncthreads();  // the previous P V product is done with ks, vs, ps
    load_tile<T, D, C::BK, C::LDX>(ks, kb, p.sk[2], p.sk[3], k0, nk, p.vec_k);
    load_tile<T, D, C::BK, C::LDX>(vs, vb, p.sv[2], p.sv[3], k0, nk, p.vec_v);
    __syncthreads();
    block_gemm<C::BQ, C::BK, D, true, false>(qs, C::LDX, ks, C::LDX, ss, C::LDS);
    __syncthreads();
    // Online softmax, one warp per row; keys past Nk get probability 0.
    for (int r = warp; r < C::BQ; r += kWarps) {
      float s[C::BK / 32];
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < C::BK / 32; ++j) {
        const int c = lane + 32 * j;
        s[j] = c < nk ? ss[r * C::LDS + c] * scale_log2 : -INFINITY;
        mx = fmaxf(mx, s[j]);
      }
      mx = warp_max(mx);
      const float m_old = mrow[r], m_new = fmaxf(m_old, mx);
      const float alpha = exp2f(m_old - m_new);  // 0 on the first tile (m_old = -inf)
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < C::BK / 32; ++j) {
        const float pv = exp2f(s[j] - m_new);
        sum += pv;
        ps[r * C::LDP + lane + 32 * j] = from_float<T>(pv);
      }
      sum = warp_sum(sum);
      for (int c = lane; c < D; c += 32) os[r * C::LDO + c] *= alpha;
      __syncwarp();  // every lane has read mrow[r] / lrow[r]
      if (lane == 0) {
        mrow[r] = m_new;
        lrow[r] = lrow[r] * alpha + sum;
      }
    }
    __syncthreads();
    block_gemm<C::BQ, D, C::BK, false, true>(ps, C::LDP, vs, C::LDX, os, C::LDO);
  }
  __syncthreads();

  T* ob = static_cast<T*>(p.out_w) + b * p.so[0] + h * p.so[1];
  for (int i = threadIdx.x; i < nq * D; i += kThreads) {
    const int r = i / D, c = i % D;
    ob[(q0 + r) * p.so[2] + c * p.so[3]] = from_float<T>(os[r * C::LDO + c] / lrow[r]);
  }
  float* lb = p.lse_w + b * p.sl[0] + h * p.sl[1];
  for (int r = threadIdx.x; r < nq; r += kThreads) lb[(q0 + r) * p.sl[2]] = (mrow[r] + log2f(lrow[r])) * kLn2;
}

// ---- backward --------------------------------------------------------------------------------
// delta[bh * Nq + i] = sum_c dO[b, h, i, c] * O[b, h, i, c]; one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.BH * p.Nq) return;  // whole warps leave together
  const int64_t i = row % p.Nq, bh = row / p.Nq, b = bh / p.H, h = bh % p.H;
  const T* g = static_cast<const T*>(p.dout) + b * p.sdo[0] + h * p.sdo[1] + i * p.sdo[2];
  const T* o = static_cast<const T*>(p.out) + b * p.so[0] + h * p.so[1] + i * p.so[2];
  float acc = 0.0f;
  for (int c = lane; c < p.d; c += 32) acc += to_float(g[c * p.sdo[3]]) * to_float(o[c * p.so[3]]);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

// Loads lse (converted to log2 units) and delta of rows q0.. of one (batch, head); rows past Nq
// get lse = +inf, so their probabilities are exactly 0.
template <int ROWS>
__device__ __forceinline__ void load_row_stats(const Params& p, int64_t bh, int q0, int nq,
                                               float* lse_s, float* del_s) {
  const int64_t b = bh / p.H, h = bh % p.H;
  const float* lb = p.lse + b * p.sl[0] + h * p.sl[1];
  for (int i = threadIdx.x; i < ROWS; i += kThreads) {
    lse_s[i] = i < nq ? lb[(q0 + i) * p.sl[2]] * kLog2e : INFINITY;
    del_s[i] = i < nq ? p.delta[bh * p.Nq + q0 + i] : 0.0f;
  }
}

// dK, dV of one key tile; loops over all query tiles.
template <typename T, int D, bool SMALL>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const Params p) {
  using C = BwdKVCfg<T, D, SMALL>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem + C::K);
  T* vs = reinterpret_cast<T*>(smem + C::V);
  T* qs = reinterpret_cast<T*>(smem + C::Q);
  T* dos = reinterpret_cast<T*>(smem + C::DO);
  float* dks = reinterpret_cast<float*>(smem + C::DK);
  float* dvs = reinterpret_cast<float*>(smem + C::DV);
  float* st = reinterpret_cast<float*>(smem + C::S);    // S^T  [BK, BQ]
  float* dpt = reinterpret_cast<float*>(smem + C::DP);  // dP^T [BK, BQ]
  T* pt = reinterpret_cast<T*>(smem + C::P);            // P^T  [BK, BQ]
  T* dst = reinterpret_cast<T*>(smem + C::DS);          // dS^T [BK, BQ]
  float* lse_s = reinterpret_cast<float*>(smem + C::LSE);
  float* del_s = reinterpret_cast<float*>(smem + C::DEL);

  const int tile = blockIdx.x % p.n_tiles;
  const int64_t bh = blockIdx.x / p.n_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int k0 = tile * C::BK, nk = min(C::BK, p.Nk - k0);
  const T* qb = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* kb = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1];
  const T* gb = static_cast<const T*>(p.dout) + b * p.sdo[0] + h * p.sdo[1];

  load_tile<T, D, C::BK, C::LDX>(ks, kb, p.sk[2], p.sk[3], k0, nk, p.vec_k);
  load_tile<T, D, C::BK, C::LDX>(vs, vb, p.sv[2], p.sv[3], k0, nk, p.vec_v);
  for (int i = threadIdx.x; i < C::BK * D; i += kThreads) {
    dks[(i / D) * C::LDA + i % D] = 0.0f;
    dvs[(i / D) * C::LDA + i % D] = 0.0f;
  }
  const float scale_log2 = p.scale * kLog2e;

  for (int q0 = 0; q0 < p.Nq; q0 += C::BQ) {
    const int nq = min(C::BQ, p.Nq - q0);
    __syncthreads();  // the previous tile's products are done with qs, dos, pt, dst
    load_tile<T, D, C::BQ, C::LDX>(qs, qb, p.sq[2], p.sq[3], q0, nq, p.vec_q);
    load_tile<T, D, C::BQ, C::LDX>(dos, gb, p.sdo[2], p.sdo[3], q0, nq, p.vec_do);
    load_row_stats<C::BQ>(p, bh, q0, nq, lse_s, del_s);
    __syncthreads();
    block_gemm<C::BK, C::BQ, D, true, false>(ks, C::LDX, qs, C::LDX, st, C::LDS);    // k_j . q_i
    block_gemm<C::BK, C::BQ, D, true, false>(vs, C::LDX, dos, C::LDX, dpt, C::LDS);  // v_j . dO_i
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BK * C::BQ; idx += kThreads) {
      const int j = idx / C::BQ, i = idx % C::BQ;
      const float pv = exp2f(st[j * C::LDS + i] * scale_log2 - lse_s[i]);
      pt[j * C::LDP + i] = from_float<T>(pv);
      dst[j * C::LDP + i] = from_float<T>(pv * (dpt[j * C::LDS + i] - del_s[i]));
    }
    __syncthreads();
    block_gemm<C::BK, D, C::BQ, false, true>(pt, C::LDP, dos, C::LDX, dvs, C::LDA);   // dV += P^T dO
    block_gemm<C::BK, D, C::BQ, false, true>(dst, C::LDP, qs, C::LDX, dks, C::LDA);   // dK += dS^T Q
  }
  __syncthreads();

  T* dkb = static_cast<T*>(p.dk) + b * p.sdk[0] + h * p.sdk[1];
  T* dvb = static_cast<T*>(p.dv) + b * p.sdv[0] + h * p.sdv[1];
  for (int i = threadIdx.x; i < nk * D; i += kThreads) {
    const int j = i / D, c = i % D;
    dkb[(k0 + j) * p.sdk[2] + c * p.sdk[3]] = from_float<T>(dks[j * C::LDA + c] * p.scale);
    dvb[(k0 + j) * p.sdv[2] + c * p.sdv[3]] = from_float<T>(dvs[j * C::LDA + c]);
  }
}

// dQ of one query tile; loops over all key tiles.
template <typename T, int D, bool SMALL>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const Params p) {
  using C = BwdQCfg<T, D, SMALL>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + C::Q);
  T* dos = reinterpret_cast<T*>(smem + C::DO);
  T* ks = reinterpret_cast<T*>(smem + C::K);
  T* vs = reinterpret_cast<T*>(smem + C::V);
  float* dqs = reinterpret_cast<float*>(smem + C::DQ);
  float* ss = reinterpret_cast<float*>(smem + C::S);    // S  [BQ, BK]
  float* dps = reinterpret_cast<float*>(smem + C::DP);  // dP [BQ, BK]
  T* dss = reinterpret_cast<T*>(smem + C::DS);          // dS [BQ, BK]
  float* lse_s = reinterpret_cast<float*>(smem + C::LSE);
  float* del_s = reinterpret_cast<float*>(smem + C::DEL);

  const int tile = blockIdx.x % p.n_tiles;
  const int64_t bh = blockIdx.x / p.n_tiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int q0 = tile * C::BQ, nq = min(C::BQ, p.Nq - q0);
  const T* qb = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* kb = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1];
  const T* gb = static_cast<const T*>(p.dout) + b * p.sdo[0] + h * p.sdo[1];

  load_tile<T, D, C::BQ, C::LDX>(qs, qb, p.sq[2], p.sq[3], q0, nq, p.vec_q);
  load_tile<T, D, C::BQ, C::LDX>(dos, gb, p.sdo[2], p.sdo[3], q0, nq, p.vec_do);
  load_row_stats<C::BQ>(p, bh, q0, nq, lse_s, del_s);
  for (int i = threadIdx.x; i < C::BQ * D; i += kThreads) dqs[(i / D) * C::LDA + i % D] = 0.0f;
  const float scale_log2 = p.scale * kLog2e;

  for (int k0 = 0; k0 < p.Nk; k0 += C::BK) {
    const int nk = min(C::BK, p.Nk - k0);
    __syncthreads();  // the previous dS K product is done with ks, dss
    load_tile<T, D, C::BK, C::LDX>(ks, kb, p.sk[2], p.sk[3], k0, nk, p.vec_k);
    load_tile<T, D, C::BK, C::LDX>(vs, vb, p.sv[2], p.sv[3], k0, nk, p.vec_v);
    __syncthreads();
    block_gemm<C::BQ, C::BK, D, true, false>(qs, C::LDX, ks, C::LDX, ss, C::LDS);    // q_i . k_j
    block_gemm<C::BQ, C::BK, D, true, false>(dos, C::LDX, vs, C::LDX, dps, C::LDS);  // dO_i . v_j
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BQ * C::BK; idx += kThreads) {
      const int i = idx / C::BK, j = idx % C::BK;
      const float pv = j < nk ? exp2f(ss[i * C::LDS + j] * scale_log2 - lse_s[i]) : 0.0f;
      dss[i * C::LDP + j] = from_float<T>(pv * (dps[i * C::LDS + j] - del_s[i]));
    }
    __syncthreads();
    block_gemm<C::BQ, D, C::BK, false, true>(dss, C::LDP, ks, C::LDX, dqs, C::LDA);  // dQ += dS K
  }
  __syncthreads();

  T* dqb = static_cast<T*>(p.dq) + b * p.sdq[0] + h * p.sdq[1];
  for (int i = threadIdx.x; i < nq * D; i += kThreads) {
    const int r = i / D, c = i % D;
    dqb[(q0 + r) * p.sdq[2] + c * p.sdq[3]] = from_float<T>(dqs[r * C::LDA + c] * p.scale);
  }
}

// ---- host side -------------------------------------------------------------------------------
template <int D>
std::string kernel_name(const char* base) {
  return std::string(base) + "<float32, d=" + std::to_string(D) + ">";
}

template <int D, typename C>
std::string kernel_name(const char* base) {
  return std::string(base) + "<float32, d=" + std::to_string(D) + ", " + std::to_string(C::BQ) +
         " queries x " + std::to_string(C::BK) + " keys>";
}

// Whether kernel `what` runs with its small tiles on `dev`: the large tiles when they fit, else
// the small ones where they exist; a ValueError in Python when neither fits. Checked for every
// kernel of a call before the first launch, so a call fails before it writes anything.
template <template <typename, int, bool> class Cfg, typename T, int D>
bool small_tiles(const DeviceLimits& dev, const char* what) {
  using Large = Cfg<T, D, false>;
  if (Large::BYTES <= dev.smem) return false;
  if constexpr (kHasSmall<Cfg, T, D>) {
    if (Cfg<T, D, true>::BYTES <= dev.smem) return true;
  }
  constexpr size_t need = kHasSmall<Cfg, T, D> ? Cfg<T, D, true>::BYTES : Large::BYTES;
  too_little_smem(what, "float32", D, need, dev);
}

// Calls f(std::true_type{}) for the small tiles, f(std::false_type{}) for the large ones; the
// small variant is instantiated only where it exists.
template <template <typename, int, bool> class Cfg, typename T, int D, typename F>
void with_tiles(bool small, F&& f) {
  if constexpr (kHasSmall<Cfg, T, D>) {
    if (small) return f(std::true_type{});
  }
  f(std::false_type{});
}

template <typename T, int D>
void forward_t(Params p, const DeviceLimits& dev, const CudaLauncher& launch) {
  const bool small = small_tiles<FwdCfg, T, D>(dev, "forward");
  with_tiles<FwdCfg, T, D>(small, [&](auto tiles) {
    constexpr bool kSmall = decltype(tiles)::value;
    using C = FwdCfg<T, D, kSmall>;
    p.n_tiles = static_cast<int>(ceil_div(p.Nq, C::BQ));
    launch(attention_fwd_kernel<T, D, kSmall>, kernel_name<D, C>("attention_fwd_kernel"), p.BH * p.n_tiles,
           kThreads, C::BYTES, p);
  });
}

template <typename T, int D>
void backward_t(Params p, const DeviceLimits& dev, const CudaLauncher& launch) {
  const bool kv_small = small_tiles<BwdKVCfg, T, D>(dev, "backward dK/dV");
  const bool q_small = small_tiles<BwdQCfg, T, D>(dev, "backward dQ");
  launch(attention_bwd_delta_kernel<T>, kernel_name<D>("attention_bwd_delta_kernel"),
         ceil_div(p.BH * p.Nq, kWarps), kThreads, 0, p);
  with_tiles<BwdKVCfg, T, D>(kv_small, [&](auto tiles) {
    constexpr bool kSmall = decltype(tiles)::value;
    using C = BwdKVCfg<T, D, kSmall>;
    p.n_tiles = static_cast<int>(ceil_div(p.Nk, C::BK));
    launch(attention_bwd_dkdv_kernel<T, D, kSmall>, kernel_name<D, C>("attention_bwd_dkdv_kernel"),
           p.BH * p.n_tiles, kThreads, C::BYTES, p);
  });
  with_tiles<BwdQCfg, T, D>(q_small, [&](auto tiles) {
    constexpr bool kSmall = decltype(tiles)::value;
    using C = BwdQCfg<T, D, kSmall>;
    p.n_tiles = static_cast<int>(ceil_div(p.Nq, C::BQ));
    launch(attention_bwd_dq_kernel<T, D, kSmall>, kernel_name<D, C>("attention_bwd_dq_kernel"),
           p.BH * p.n_tiles, kThreads, C::BYTES, p);
  });
}

Params make_params(const AttentionShape& s, float scale) {
  if (s.Nq > 0x7fffffff || s.Nk > 0x7fffffff || s.H > 0x7fffffff)
    throw std::invalid_argument("armfast CUDA attention: sequence length or head count too large");
  Params p{};
  p.H = static_cast<int>(s.H), p.Nq = static_cast<int>(s.Nq), p.Nk = static_cast<int>(s.Nk);
  p.d = static_cast<int>(s.d);
  p.BH = s.B * s.H;
  p.scale = scale;
  return p;
}

}  // namespace

void attention_forward_exact(const AttentionShape& s, Strided q, Strided k, Strided v, Strided out, Strided lse,
                             float scale, const DeviceLimits& dev, std::uintptr_t stream) {
  Params p = make_params(s, scale);
  p.q = q.data, p.k = k.data, p.v = v.data, p.out_w = out.data;
  p.lse_w = static_cast<float*>(lse.data);
  copy_strides(p.sq, q, 4), copy_strides(p.sk, k, 4), copy_strides(p.sv, v, 4);
  copy_strides(p.so, out, 4), copy_strides(p.sl, lse, 3);
  p.vec_q = vec_ok<float>(q), p.vec_k = vec_ok<float>(k), p.vec_v = vec_ok<float>(v);
  const CudaLauncher launch{dev, reinterpret_cast<cudaStream_t>(stream)};
  with_head_dim(s.d, [&](auto dim) { forward_t<float, decltype(dim)::value>(p, dev, launch); });
}

void attention_backward_exact(const AttentionShape& s, Strided dout, Strided q, Strided k, Strided v, Strided out,
                              Strided lse, float* delta, Strided dq, Strided dk, Strided dv, float scale,
                              const DeviceLimits& dev, std::uintptr_t stream) {
  Params p = make_params(s, scale);
  p.q = q.data, p.k = k.data, p.v = v.data, p.dout = dout.data, p.out = out.data;
  p.lse = static_cast<const float*>(lse.data);
  p.delta = delta;
  p.dq = dq.data, p.dk = dk.data, p.dv = dv.data;
  copy_strides(p.sq, q, 4), copy_strides(p.sk, k, 4), copy_strides(p.sv, v, 4);
  copy_strides(p.sdo, dout, 4), copy_strides(p.so, out, 4), copy_strides(p.sl, lse, 3);
  copy_strides(p.sdq, dq, 4), copy_strides(p.sdk, dk, 4), copy_strides(p.sdv, dv, 4);
  p.vec_q = vec_ok<float>(q), p.vec_k = vec_ok<float>(k), p.vec_v = vec_ok<float>(v), p.vec_do = vec_ok<float>(dout);
  const CudaLauncher launch{dev, reinterpret_cast<cudaStream_t>(stream)};
  with_head_dim(s.d, [&](auto dim) { backward_t<float, decltype(dim)::value>(p, dev, launch); });
}

}  // namespace armfast::cuda
