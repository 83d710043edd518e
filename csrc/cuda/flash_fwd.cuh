// Flash attention forward on tensor cores, in the FlashAttention-2 manner.
//
// A block owns BQ = 16 * MT * WARPS query rows of one (batch, head); warp w owns rows
// 16 MT w .. 16 MT (w + 1) - 1 and keeps them in registers for the whole kernel: its Q fragments,
// the scores S and probabilities P of the current key tile, the output accumulator O and the
// running row max m and sum l. Key tiles of BK rows stream through shared memory:
//
//   for each key tile j:
//     cp.async V_j                       (lands while S_j is computed)
//     S = Q K_j^T                        (ldmatrix K_j, mma)
//     wait V_j; barrier; cp.async K_j+1  (lands during softmax and P V)
//     mask keys >= Nk (last tile only); online softmax of S in registers, base 2, with
//       scale * log2(e) folded into one FMA per score; row max/sum within the quad of lanes
//       that share a row
//     O += P V_j                         (P repacked from S's accumulators; ldmatrix.trans V_j)
//     wait K_j+1; barrier
//
// so K and V need one buffer each. At the end O / l goes out through arbitrary strides (16-byte
// stores staged through the warp's own Q rows when the rows are contiguous) and
// lse = m * scale + ln(l) per row.
#pragma once

#include <cmath>

#include "flash_common.cuh"

namespace armfast::cuda::flash {

template <typename T, int D_, int WARPS_, int MT_, int BK_>
struct FwdConfig {
  using Elem = T;
  static constexpr int D = D_, WARPS = WARPS_, MT = MT_, BK = BK_;
  static constexpr int THREADS = 32 * WARPS, BQ = 16 * MT * WARPS;
  // Row pitch: kPad elements past D keep rows 16-byte aligned and shift consecutive rows by
  // 4 banks, so the 8 row addresses of each ldmatrix phase hit distinct banks.
  static constexpr int LD = D + kPad;
  static constexpr size_t Q = 0;
  static constexpr size_t K = Q + sizeof(T) * BQ * LD;
  static constexpr size_t V = K + sizeof(T) * BK * LD;
  static constexpr size_t SMEM = V + sizeof(T) * BK * LD;
  static_assert(D % 16 == 0 && BK % 16 == 0, "tiles are whole 16 x 16 blocks");
};

template <class C>
__global__ void __launch_bounds__(C::THREADS) flash_fwd_kernel(const AttnParams p) {
  using T = typename C::Elem;
  using M = Mma<T>;
  constexpr int D = C::D, MT = C::MT, BK = C::BK, BQ = C::BQ, LD = C::LD, THREADS = C::THREADS;
  constexpr int KS = D / M::K;  // k steps of S = Q K^T
  constexpr int NT = BK / 8;    // n8 tiles of S
  constexpr int DT = D / 8;     // n8 tiles of O

  ARMFAST_DYNAMIC_SMEM(smem);
  T* qs = reinterpret_cast<T*>(smem + C::Q);
  T* ks = reinterpret_cast<T*>(smem + C::K);
  T* vs = reinterpret_cast<T*>(smem + C::V);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const BlockTile w = block_tile(p);
  const int q0 = w.tile * BQ;
  const T* qg = w.slice<const T>(p.q, p.sq);
  const T* kg = w.slice<const T>(p.k, p.sk);
  const T* vg = w.slice<const T>(p.v, p.sv);
  const int n_kt = ceil_div_int(p.Nk, BK);

  load_rows<T, BQ, D, THREADS>(qs, LD, qg, p.sq[2], p.sq[3], q0, std::min(BQ, p.Nq - q0), p.vec_q);
  load_rows<T, BK, D, THREADS>(ks, LD, kg, p.sk[2], p.sk[3], 0, std::min(BK, p.Nk), p.vec_k);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int wrow = warp * MT * 16;  // the warp's first row in the tile
  uint32_t qf[MT][KS][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) M::load_a(qf[mt][kk], qs + (wrow + 16 * mt) * LD + kk * M::K, LD);

  float o[MT][DT][4];
  float row_max[MT][2], row_sum[MT][2];  // max of raw scores; this lane's share of sum 2^(...)
  zero(o);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }
  const float sl2 = p.scale_log2;

  for (int j = 0; j < n_kt; ++j) {
    const int k0 = j * BK;
    load_rows<T, BK, D, THREADS>(vs, LD, vg, p.sv[2], p.sv[3], k0, std::min(BK, p.Nk - k0), p.vec_v);
    cp_async_commit();

    float s[MT][NT][4];
    zero(s);
    scores<T, MT, NT, KS>(s, QInRegisters<MT, KS>{qf}, ks, LD);

    cp_async_wait<0>();  // V_j
    __syncthreads();     // V_j visible to all; every warp is done with K_j
    if (j + 1 < n_kt) {
      load_rows<T, BK, D, THREADS>(ks, LD, kg, p.sk[2], p.sk[3], k0 + BK, std::min(BK, p.Nk - k0 - BK), p.vec_k);
      cp_async_commit();
    }

    if (k0 + BK > p.Nk) {  // the last, partial tile: keys past Nk get probability 0
      const int valid = p.Nk - k0;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (8 * nt + mma::c_col(lane, e) >= valid) s[mt][nt][e] = -INFINITY;
    }

    online_softmax(s, row_max, row_sum, o, sl2);
    accumulate_pv<T>(o, s, vs, LD);
    cp_async_wait<0>();  // K_j+1
    __syncthreads();     // K_j+1 visible; every warp is done with V_j
  }

  float inv[MT][2];
  float* lse = p.lse + w.b * p.sl[0] + w.h * p.sl[1];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float sum = quad_sum(row_sum[mt][half]);
      inv[mt][half] = 1.0f / sum;
      const int row = q0 + wrow + 16 * mt + mma::c_row(lane, 2 * half);
      if (mma::lane_quad(lane) == 0 && row < p.Nq)
        lse[row * p.sl[2]] = row_max[mt][half] * p.scale + log2f(sum) * kLn2;
    }
  T* og = w.slice<T>(p.out, p.so);
  // The warp's own Q rows are free now (its Q fragments are in registers).
  store_acc_rows<T, MT, DT>(o, inv, qs + wrow * LD, LD, og, p.so[2], p.so[3], q0 + wrow, p.Nq, p.vec_o);
}

}  // namespace armfast::cuda::flash
