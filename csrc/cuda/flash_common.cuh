// What the flash-attention kernels share: the parameters of a call, cooperative tile loads
// (cp.async with zero-filled tails, or a plain strided path), the store of a warp's
// accumulator rows through arbitrary strides, and the forward kernels' register-tile steps
// (S = Q K^T, online softmax, O += P V).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "armfast/warp_mma.cuh"

namespace armfast::cuda::flash {

// Pointers and element strides of one attention call ([B, H, N, d] tensors, lse [B, H, Nq]).
struct AttnParams {
  const void *q, *k, *v;
  const void *out_in, *dout;  // backward: the forward's output and its gradient
  void *out, *dq, *dk, *dv;
  float* lse;       // written by the forward, read by the backward
  float* delta;     // [B*H*Nq] rowsum(dO * O), backward workspace
  float* dq_accum;  // [B*H*Nq, d] fp32 dQ accumulated with atomics, or null (deterministic mode)
  int64_t sq[4], sk[4], sv[4], so[4], sdo[4], sdq[4], sdk[4], sdv[4], sl[3];
  int64_t BH;
  int H, Nq, Nk;
  int n_tiles;  // tiles along the sequence a block walks over: blockIdx.x = bh * n_tiles + tile
  float scale, scale_log2;
  // 16-byte global accesses allowed: unit inner stride, 16-byte aligned rows
  bool vec_q, vec_k, vec_v, vec_o, vec_do, vec_dq, vec_dk, vec_dv;
};

constexpr int kPad = 8;  // elements of padding per shared-memory row (see Fwd/Bwd configs)

__host__ __device__ constexpr int ceil_div_int(int a, int b) { return (a + b - 1) / b; }

// The tile of one (batch, head) a block works on: blockIdx.x = bh * n_tiles + tile.
struct BlockTile {
  int tile;
  int64_t bh, b, h;
  // Element (0, 0) of this (batch, head)'s [N, d] slice of a [B, H, N, d] tensor.
  template <typename T>
  __device__ __forceinline__ T* slice(const void* base, const int64_t (&stride)[4]) const {
    return static_cast<T*>(const_cast<void*>(base)) + b * stride[0] + h * stride[1];
  }
};

__device__ __forceinline__ BlockTile block_tile(const AttnParams& p) {
  const int64_t bh = blockIdx.x / p.n_tiles;
  return BlockTile{static_cast<int>(blockIdx.x % p.n_tiles), bh, bh / p.H, bh % p.H};
}

// The block's THREADS threads copy rows row0 .. row0 + ROWS - 1 of a [N, COLS] slice (row stride
// `rs`, column stride `cs`) into dst (row pitch `ld`); rows past `nvalid` become zeros. With `vec`
// (cs == 1, 16-byte aligned rows) as cp.async 16-byte copies in the current group, else with
// plain loads and stores.
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* src, int64_t rs, int64_t cs, int row0,
                                          int nvalid, bool vec) {
  if (vec) {
    constexpr int PER = 16 / sizeof(T), CHUNKS = COLS / PER;
    static_assert(COLS % PER == 0, "rows are whole 16-byte chunks");
#pragma unroll 2
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += THREADS) {
      const int r = idx / CHUNKS, c = (idx % CHUNKS) * PER;
      const bool ok = r < nvalid;
      cp_async_16(dst + r * ld + c, ok ? src + (row0 + r) * rs + c : src, ok ? 16 : 0);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * COLS; idx += THREADS) {
      const int r = idx / COLS, c = idx % COLS;
      dst[r * ld + c] = r < nvalid ? src[(row0 + r) * rs + c * cs] : from_float<T>(0.0f);
    }
  }
}

// Writes one warp's accumulators acc[MT][NT][4] (rows: MT m16 tiles, columns: NT n8 tiles),
// times row_mul[mt][half] (half 0: the lane's row `group`, 1: `group + 8`), as rows
// row0 .. row0 + 16 MT - 1 of a [nrows, 8 NT] slice with row stride `rs` and column stride `cs`;
// rows >= nrows are skipped. With `vec` the rows go through `stage` (16 MT rows of pitch ld that
// only this warp touches) so that global stores are 16 bytes wide.
template <typename T, int MT, int NT>
__device__ __forceinline__ void store_acc_rows(const float (&acc)[MT][NT][4], const float (&row_mul)[MT][2],
                                               T* stage, int ld, T* dst, int64_t rs, int64_t cs, int row0,
                                               int nrows, bool vec) {
  const int lane = threadIdx.x % 32;
  if (vec) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = mt * 16 + mma::c_row(lane, 2 * half), c = nt * 8 + mma::c_col(lane, 2 * half);
          const float f = row_mul[mt][half];
          store_pair<T>(stage + r * ld + c, acc[mt][nt][2 * half] * f, acc[mt][nt][2 * half + 1] * f);
        }
    __syncwarp();
    constexpr int PER = 16 / sizeof(T), CHUNKS = 8 * NT / PER;
    for (int idx = lane; idx < 16 * MT * CHUNKS; idx += 32) {
      const int r = idx / CHUNKS, c = (idx % CHUNKS) * PER;
      if (row0 + r < nrows)
        *reinterpret_cast<uint4*>(dst + (row0 + r) * rs + c) = *reinterpret_cast<const uint4*>(stage + r * ld + c);
    }
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = row0 + mt * 16 + mma::c_row(lane, e), c = nt * 8 + mma::c_col(lane, e);
          if (r < nrows) dst[r * rs + c * cs] = from_float<T>(acc[mt][nt][e] * row_mul[mt][e >> 1]);
        }
  }
}

// ---- a warp's register tiles in the forward kernels (flash_fwd.cuh, baseline_fwd.cuh) -----------

// s[MT][NT] += Q K^T of the warp's rows, K a [16 NT][ld] tile; q_frag(a, mt, kk) supplies the A
// fragment of Q for m16 tile mt and k step kk (KS steps).
template <typename T, int MT, int NT, int KS, class QFrag>
__device__ __forceinline__ void scores(float (&s)[MT][NT][4], QFrag&& q_frag, const T* ks, int ld) {
  using M = Mma<T>;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t qa[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) q_frag(qa[mt], mt, kk);
#pragma unroll
    for (int nn = 0; nn < NT / 2; ++nn) {
      uint32_t kb[2][2];
      M::load_b(kb, ks + 16 * nn * ld + kk * M::K, ld);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_sync<T>(s[mt][2 * nn], qa[mt], kb[0]);
        mma_sync<T>(s[mt][2 * nn + 1], qa[mt], kb[1]);
      }
    }
  }
}

// Q's A fragments kept in registers, or read from shared memory (q: the warp's first row, pitch
// ld) one k step at a time, for kernels that cannot keep all of them in registers.
template <int MT, int KS>
struct QInRegisters {
  const uint32_t (&f)[MT][KS][4];
  __device__ __forceinline__ void operator()(uint32_t (&a)[4], int mt, int kk) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = f[mt][kk][i];
  }
};
template <typename T>
struct QInSharedMemory {
  const T* q;
  int ld;
  __device__ __forceinline__ void operator()(uint32_t (&a)[4], int mt, int kk) const {
    Mma<T>::load_a(a, q + 16 * mt * ld + kk * Mma<T>::K, ld);
  }
};

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&s)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;
}

// One key tile of raw scores s (-inf: masked) into the running row max / sum and the output
// accumulators o; s becomes P = exp2(s * sl2 - max * sl2). A row whose keys are all masked so far
// keeps max = -inf and gets p = alpha = 0, never NaN.
template <int MT, int NT, int DT>
__device__ __forceinline__ void online_softmax(float (&s)[MT][NT][4], float (&row_max)[MT][2], float (&row_sum)[MT][2],
                                               float (&o)[MT][DT][4], float sl2) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = row_max[mt][half];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
      mx = quad_max(mx);
      const float mx_scaled = mx == -INFINITY ? 0.0f : mx * sl2;
      const float alpha = exp2f(row_max[mt][half] * sl2 - mx_scaled);
      row_max[mt][half] = mx;
      row_sum[mt][half] *= alpha;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[mt][dt][2 * half] *= alpha;
        o[mt][dt][2 * half + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const float p = exp2f(fmaf(s[mt][nt][e], sl2, -mx_scaled));
          s[mt][nt][e] = p;
          row_sum[mt][half] += p;
        }
    }
}

// o += P V: P from the accumulators of s (16 NT keys), V a [16 NT][ld] tile of 8 DT columns.
template <typename T, int MT, int NT, int DT>
__device__ __forceinline__ void accumulate_pv(float (&o)[MT][DT][4], const float (&s)[MT][NT][4], const T* vs, int ld) {
  using M = Mma<T>;
#pragma unroll
  for (int kk = 0; kk < 8 * NT / M::K; ++kk) {
    uint32_t pa[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) M::a_from_acc(pa[mt], s[mt], kk);
#pragma unroll
    for (int nn = 0; nn < DT / 2; ++nn) {
      uint32_t vb[2][2];
      M::load_b_trans(vb, vs + kk * M::K * ld + 16 * nn, ld);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_sync<T>(o[mt][2 * nn], pa[mt], vb[0]);
        mma_sync<T>(o[mt][2 * nn + 1], pa[mt], vb[1]);
      }
    }
  }
}

}  // namespace armfast::cuda::flash
