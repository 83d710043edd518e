// Flash attention backward on tensor cores, in the FlashAttention-2 manner.
//
//   preprocess   delta = rowsum(dO * O) (one warp per row); zeroes the fp32 dQ accumulator
//   dkdv         one block per (batch*head, key block of BK = 16 * WARPS keys); warp w owns keys
//                16 w .. 16 w + 15 and keeps their dK, dV in registers while query tiles of BQ
//                rows stream through shared memory, double-buffered with cp.async:
//                  S^T = K Q^T, dP^T = V dO^T                   (K, V rows from smem as A)
//                  P^T = 2^(S^T scale log2 e - lse log2 e),  dS^T = P^T (dP^T - delta)
//                  dV += P^T dO, dK += dS^T Q                  (P^T, dS^T straight from registers)
//                and with ATOMIC_DQ also
//                  dQ_tile += dS K                             (dS^T through smem, fp32 atomics)
//                which makes the whole backward 5 products, each input read once per key block.
//   convert_dq   dq = dQ_accum * scale in the input dtype, through dq's strides
//   dq           deterministic mode (torch.use_deterministic_algorithms): one block per query
//                tile recomputes S and dP over all key tiles and accumulates dQ in registers;
//                with dkdv<ATOMIC_DQ = false> the gradients are bitwise reproducible.
#pragma once

#include <cmath>

#include "flash_common.cuh"

namespace armfast::cuda::flash {

// ---- preprocess and dQ conversion --------------------------------------------------------------
constexpr int kRowThreads = 128, kRowWarps = kRowThreads / 32;

template <typename T, int D>
__global__ void __launch_bounds__(kRowThreads) flash_bwd_preprocess_kernel(const AttnParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.BH * p.Nq) return;  // whole warps leave together
  const int64_t i = row % p.Nq, bh = row / p.Nq, b = bh / p.H, h = bh % p.H;
  const T* g = static_cast<const T*>(p.dout) + b * p.sdo[0] + h * p.sdo[1] + i * p.sdo[2];
  const T* o = static_cast<const T*>(p.out_in) + b * p.so[0] + h * p.so[1] + i * p.so[2];
  float acc = 0.0f;
#pragma unroll
  for (int c = lane; c < D; c += 32) acc = fmaf(to_float(g[c * p.sdo[3]]), to_float(o[c * p.so[3]]), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
  if (p.dq_accum != nullptr) {
#pragma unroll
    for (int c = lane; c < D; c += 32) p.dq_accum[row * D + c] = 0.0f;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kRowThreads) flash_bwd_convert_dq_kernel(const AttnParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.BH * p.Nq) return;
  const int64_t i = row % p.Nq, bh = row / p.Nq, b = bh / p.H, h = bh % p.H;
  T* dq = static_cast<T*>(p.dq) + b * p.sdq[0] + h * p.sdq[1] + i * p.sdq[2];
#pragma unroll
  for (int c = lane; c < D; c += 32) dq[c * p.sdq[3]] = from_float<T>(p.dq_accum[row * D + c] * p.scale);
}

// ---- dK, dV (and atomic dQ) --------------------------------------------------------------------
template <typename T, int D_, int WARPS_, int BQ_, bool ATOMIC_DQ_>
struct BwdKVConfig {
  using Elem = T;
  static constexpr int D = D_, WARPS = WARPS_, BQ = BQ_;
  static constexpr bool ATOMIC_DQ = ATOMIC_DQ_;
  static constexpr int THREADS = 32 * WARPS, BK = 16 * WARPS;
  static constexpr int LD = D + kPad;    // K, V, Q, dO rows
  static constexpr int LDS = BQ + kPad;  // dS^T rows
  static constexpr size_t TILE_KV = sizeof(T) * BK * LD, TILE_Q = sizeof(T) * BQ * LD;
  static constexpr size_t K = 0;
  static constexpr size_t V = K + TILE_KV;
  static constexpr size_t Q = V + TILE_KV;         // 2 stages
  static constexpr size_t DO = Q + 2 * TILE_Q;     // 2 stages
  static constexpr size_t DS = DO + 2 * TILE_Q;
  static constexpr size_t LSE = DS + (ATOMIC_DQ ? sizeof(T) * BK * LDS : 0);  // 2 stages of BQ floats
  static constexpr size_t DEL = LSE + 2 * sizeof(float) * BQ;                  // 2 stages of BQ floats
  static constexpr size_t SMEM = DEL + 2 * sizeof(float) * BQ;
  // dQ tile (BQ x D) split over the warps: RG row groups of 16 queries x CS column slices of DC.
  static constexpr int RG = BQ / 16, CS = WARPS / RG, DC = D / CS;
  static_assert(D % 16 == 0 && BQ % 16 == 0, "tiles are whole 16 x 16 blocks");
  static_assert(WARPS % RG == 0 && DC % 16 == 0, "the dQ tile splits evenly over the warps");
};

template <class C>
__global__ void __launch_bounds__(C::THREADS) flash_bwd_dkdv_kernel(const AttnParams p) {
  using T = typename C::Elem;
  using M = Mma<T>;
  constexpr int D = C::D, BK = C::BK, BQ = C::BQ, LD = C::LD, LDS = C::LDS, THREADS = C::THREADS;
  constexpr int KS = D / M::K;   // k steps of S^T = K Q^T and dP^T = V dO^T
  constexpr int PS = BQ / M::K;  // k steps of dV += P^T dO and dK += dS^T Q
  constexpr int QT = BQ / 8;     // n8 tiles of S^T
  constexpr int DT = D / 8;      // n8 tiles of dK, dV

  ARMFAST_DYNAMIC_SMEM(smem);
  T* ks = reinterpret_cast<T*>(smem + C::K);
  T* vs = reinterpret_cast<T*>(smem + C::V);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const BlockTile w = block_tile(p);
  const int k0 = w.tile * BK;
  const T* qg = w.slice<const T>(p.q, p.sq);
  const T* kg = w.slice<const T>(p.k, p.sk);
  const T* vg = w.slice<const T>(p.v, p.sv);
  const T* gg = w.slice<const T>(p.dout, p.sdo);
  const float* lse_g = p.lse + w.b * p.sl[0] + w.h * p.sl[1];
  const float* delta_g = p.delta + w.bh * p.Nq;
  const int n_qt = ceil_div_int(p.Nq, BQ);

  // Stage `st` <- query tile `qt`: Q and dO rows (cp.async), lse in log2 units and delta (plain
  // stores; rows past Nq get lse = +inf, so their probabilities are exactly 0).
  auto load_stage = [&](int st, int qt) {
    const int q0 = qt * BQ, nq = std::min(BQ, p.Nq - q0);
    T* qs = reinterpret_cast<T*>(smem + C::Q) + st * BQ * LD;
    T* dos = reinterpret_cast<T*>(smem + C::DO) + st * BQ * LD;
    load_rows<T, BQ, D, THREADS>(qs, LD, qg, p.sq[2], p.sq[3], q0, nq, p.vec_q);
    load_rows<T, BQ, D, THREADS>(dos, LD, gg, p.sdo[2], p.sdo[3], q0, nq, p.vec_do);
    float* lse_s = reinterpret_cast<float*>(smem + C::LSE) + st * BQ;
    float* del_s = reinterpret_cast<float*>(smem + C::DEL) + st * BQ;
    for (int r = threadIdx.x; r < BQ; r += THREADS) {
      lse_s[r] = r < nq ? lse_g[(q0 + r) * p.sl[2]] * kLog2e : INFINITY;
      del_s[r] = r < nq ? delta_g[q0 + r] : 0.0f;
    }
  };

  load_rows<T, BK, D, THREADS>(ks, LD, kg, p.sk[2], p.sk[3], k0, std::min(BK, p.Nk - k0), p.vec_k);
  load_rows<T, BK, D, THREADS>(vs, LD, vg, p.sv[2], p.sv[3], k0, std::min(BK, p.Nk - k0), p.vec_v);
  load_stage(0, 0);
  cp_async_commit();

  float dk[1][DT][4], dv[1][DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[0][dt][e] = dv[0][dt][e] = 0.0f;
  const int wkey = 16 * warp;  // the warp's first key in the block
  const bool key_tail = k0 + BK > p.Nk;
  const float sl2 = p.scale_log2;

  for (int i = 0; i < n_qt; ++i) {
    const int st = i & 1;
    if (i + 1 < n_qt) {
      load_stage(st ^ 1, i + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // stage st (and, first time round, K and V) visible to all
    const T* qs = reinterpret_cast<const T*>(smem + C::Q) + st * BQ * LD;
    const T* dos = reinterpret_cast<const T*>(smem + C::DO) + st * BQ * LD;
    const float* lse_s = reinterpret_cast<const float*>(smem + C::LSE) + st * BQ;
    const float* del_s = reinterpret_cast<const float*>(smem + C::DEL) + st * BQ;

    float s[QT][4], dp[QT][4];  // S^T and dP^T of the warp's 16 keys x BQ queries
#pragma unroll
    for (int nt = 0; nt < QT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      uint32_t ka[4], va[4];
      M::load_a(ka, ks + wkey * LD + kk * M::K, LD);
      M::load_a(va, vs + wkey * LD + kk * M::K, LD);
#pragma unroll
      for (int nn = 0; nn < QT / 2; ++nn) {
        uint32_t fb[2][2];
        M::load_b(fb, qs + 16 * nn * LD + kk * M::K, LD);
        mma_sync<T>(s[2 * nn], ka, fb[0]);
        mma_sync<T>(s[2 * nn + 1], ka, fb[1]);
        M::load_b(fb, dos + 16 * nn * LD + kk * M::K, LD);
        mma_sync<T>(dp[2 * nn], va, fb[0]);
        mma_sync<T>(dp[2 * nn + 1], va, fb[1]);
      }
    }

    // s <- P^T, dp <- dS^T; keys past Nk (last key block only) get P = 0.
#pragma unroll
    for (int nt = 0; nt < QT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q = 8 * nt + mma::c_col(lane, e);
        float pv = exp2f(fmaf(s[nt][e], sl2, -lse_s[q]));
        if (key_tail && k0 + wkey + mma::c_row(lane, e) >= p.Nk) pv = 0.0f;
        s[nt][e] = pv;
        dp[nt][e] = pv * (dp[nt][e] - del_s[q]);
      }

#pragma unroll
    for (int kk = 0; kk < PS; ++kk) {
      uint32_t pa[4], da[4];
      M::a_from_acc(pa, s, kk);
      M::a_from_acc(da, dp, kk);
#pragma unroll
      for (int nn = 0; nn < DT / 2; ++nn) {
        uint32_t fb[2][2];
        M::load_b_trans(fb, dos + kk * M::K * LD + 16 * nn, LD);
        mma_sync<T>(dv[0][2 * nn], pa, fb[0]);
        mma_sync<T>(dv[0][2 * nn + 1], pa, fb[1]);
        M::load_b_trans(fb, qs + kk * M::K * LD + 16 * nn, LD);
        mma_sync<T>(dk[0][2 * nn], da, fb[0]);
        mma_sync<T>(dk[0][2 * nn + 1], da, fb[1]);
      }
    }

    if constexpr (C::ATOMIC_DQ) {
      T* dss = reinterpret_cast<T*>(smem + C::DS);  // dS^T [BK][BQ]
#pragma unroll
      for (int nt = 0; nt < QT; ++nt)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          store_pair<T>(dss + (wkey + mma::c_row(lane, 2 * half)) * LDS + 8 * nt + mma::c_col(lane, 2 * half),
                        dp[nt][2 * half], dp[nt][2 * half + 1]);
      __syncthreads();  // all of dS^T visible

      // dQ_tile[rows 16 rg.., cols DC cs..] = dS K: A = dS from dS^T (transposed), B = K rows.
      const int rg = warp % C::RG, cs = warp / C::RG;
      float dq[C::DC / 8][4];
#pragma unroll
      for (int nt = 0; nt < C::DC / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[nt][e] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < BK / M::K; ++kk) {
        uint32_t a[4];
        M::load_a_trans(a, dss + kk * M::K * LDS + 16 * rg, LDS);
#pragma unroll
        for (int nn = 0; nn < C::DC / 16; ++nn) {
          uint32_t fb[2][2];
          M::load_b_trans(fb, ks + kk * M::K * LD + cs * C::DC + 16 * nn, LD);
          mma_sync<T>(dq[2 * nn], a, fb[0]);
          mma_sync<T>(dq[2 * nn + 1], a, fb[1]);
        }
      }
      const int qrow0 = i * BQ + 16 * rg;
      float* acc = p.dq_accum + (w.bh * p.Nq + qrow0) * D + cs * C::DC;
#pragma unroll
      for (int nt = 0; nt < C::DC / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = mma::c_row(lane, e);
          if (qrow0 + r < p.Nq) atomicAdd(acc + r * D + 8 * nt + mma::c_col(lane, e), dq[nt][e]);
        }
    }
    __syncthreads();  // every warp is done with stage st (refilled next iteration) and dS^T
  }

  // Out through the warp's own K and V rows (no warp reads K or V any more).
  const float kscale[1][2] = {{p.scale, p.scale}}, one[1][2] = {{1.0f, 1.0f}};
  T* dkg = w.slice<T>(p.dk, p.sdk);
  T* dvg = w.slice<T>(p.dv, p.sdv);
  store_acc_rows<T, 1, DT>(dk, kscale, ks + wkey * LD, LD, dkg, p.sdk[2], p.sdk[3], k0 + wkey, p.Nk, p.vec_dk);
  store_acc_rows<T, 1, DT>(dv, one, vs + wkey * LD, LD, dvg, p.sdv[2], p.sdv[3], k0 + wkey, p.Nk, p.vec_dv);
}

// ---- deterministic dQ --------------------------------------------------------------------------
template <typename T, int D_, int WARPS_, int BK_>
struct BwdQConfig {
  using Elem = T;
  static constexpr int D = D_, WARPS = WARPS_, BK = BK_;
  static constexpr int THREADS = 32 * WARPS, BQ = 16 * WARPS;
  static constexpr int LD = D + kPad;
  static constexpr size_t TILE_Q = sizeof(T) * BQ * LD, TILE_KV = sizeof(T) * BK * LD;
  static constexpr size_t Q = 0;
  static constexpr size_t DO = Q + TILE_Q;
  static constexpr size_t K = DO + TILE_Q;  // 2 stages
  static constexpr size_t V = K + 2 * TILE_KV;  // 2 stages
  static constexpr size_t SMEM = V + 2 * TILE_KV;
  static_assert(D % 16 == 0 && BK % 16 == 0, "tiles are whole 16 x 16 blocks");
};

template <class C>
__global__ void __launch_bounds__(C::THREADS) flash_bwd_dq_kernel(const AttnParams p) {
  using T = typename C::Elem;
  using M = Mma<T>;
  constexpr int D = C::D, BK = C::BK, BQ = C::BQ, LD = C::LD, THREADS = C::THREADS;
  constexpr int KS = D / M::K;   // k steps of S = Q K^T and dP = dO V^T
  constexpr int PS = BK / M::K;  // k steps of dQ += dS K
  constexpr int NT = BK / 8;     // n8 tiles of S
  constexpr int DT = D / 8;      // n8 tiles of dQ

  ARMFAST_DYNAMIC_SMEM(smem);
  T* qs = reinterpret_cast<T*>(smem + C::Q);
  T* dos = reinterpret_cast<T*>(smem + C::DO);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const BlockTile w = block_tile(p);
  const int q0 = w.tile * BQ, nq = std::min(BQ, p.Nq - q0);
  const T* qg = w.slice<const T>(p.q, p.sq);
  const T* kg = w.slice<const T>(p.k, p.sk);
  const T* vg = w.slice<const T>(p.v, p.sv);
  const T* gg = w.slice<const T>(p.dout, p.sdo);
  const int n_kt = ceil_div_int(p.Nk, BK);

  auto load_kv = [&](int st, int kt) {
    const int k0 = kt * BK, nk = std::min(BK, p.Nk - k0);
    load_rows<T, BK, D, THREADS>(reinterpret_cast<T*>(smem + C::K) + st * BK * LD, LD, kg, p.sk[2], p.sk[3], k0, nk, p.vec_k);
    load_rows<T, BK, D, THREADS>(reinterpret_cast<T*>(smem + C::V) + st * BK * LD, LD, vg, p.sv[2], p.sv[3], k0, nk, p.vec_v);
  };
  load_rows<T, BQ, D, THREADS>(qs, LD, qg, p.sq[2], p.sq[3], q0, nq, p.vec_q);
  load_rows<T, BQ, D, THREADS>(dos, LD, gg, p.sdo[2], p.sdo[3], q0, nq, p.vec_do);
  load_kv(0, 0);
  cp_async_commit();

  // This lane's two rows (group, group + 8): lse in log2 units (+inf past Nq) and delta.
  const int wrow = 16 * warp;
  float lse2[2], del[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = q0 + wrow + mma::c_row(lane, 2 * half);
    lse2[half] = r < p.Nq ? p.lse[w.b * p.sl[0] + w.h * p.sl[1] + r * p.sl[2]] * kLog2e : INFINITY;
    del[half] = r < p.Nq ? p.delta[w.bh * p.Nq + r] : 0.0f;
  }
  uint32_t qf[KS][4], gf[KS][4];
  float dq[1][DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[0][dt][e] = 0.0f;
  const float sl2 = p.scale_log2;

  for (int j = 0; j < n_kt; ++j) {
    const int st = j & 1, k0 = j * BK;
    if (j + 1 < n_kt) {
      load_kv(st ^ 1, j + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // K_j, V_j (and Q, dO the first time) visible to all
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        M::load_a(qf[kk], qs + wrow * LD + kk * M::K, LD);
        M::load_a(gf[kk], dos + wrow * LD + kk * M::K, LD);
      }
    }
    const T* kst = reinterpret_cast<const T*>(smem + C::K) + st * BK * LD;
    const T* vst = reinterpret_cast<const T*>(smem + C::V) + st * BK * LD;

    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int nn = 0; nn < NT / 2; ++nn) {
        uint32_t fb[2][2];
        M::load_b(fb, kst + 16 * nn * LD + kk * M::K, LD);
        mma_sync<T>(s[2 * nn], qf[kk], fb[0]);
        mma_sync<T>(s[2 * nn + 1], qf[kk], fb[1]);
        M::load_b(fb, vst + 16 * nn * LD + kk * M::K, LD);
        mma_sync<T>(dp[2 * nn], gf[kk], fb[0]);
        mma_sync<T>(dp[2 * nn + 1], gf[kk], fb[1]);
      }

    const int valid = p.Nk - k0;  // keys past Nk (last tile only) get P = 0
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pv = exp2f(fmaf(s[nt][e], sl2, -lse2[e >> 1]));
        if (8 * nt + mma::c_col(lane, e) >= valid) pv = 0.0f;
        dp[nt][e] = pv * (dp[nt][e] - del[e >> 1]);
      }

#pragma unroll
    for (int kk = 0; kk < PS; ++kk) {
      uint32_t da[4];
      M::a_from_acc(da, dp, kk);
#pragma unroll
      for (int nn = 0; nn < DT / 2; ++nn) {
        uint32_t fb[2][2];
        M::load_b_trans(fb, kst + kk * M::K * LD + 16 * nn, LD);
        mma_sync<T>(dq[0][2 * nn], da, fb[0]);
        mma_sync<T>(dq[0][2 * nn + 1], da, fb[1]);
      }
    }
    __syncthreads();  // every warp is done with stage st (refilled next iteration)
  }

  const float qscale[1][2] = {{p.scale, p.scale}};
  T* dqg = w.slice<T>(p.dq, p.sdq);
  store_acc_rows<T, 1, DT>(dq, qscale, qs + wrow * LD, LD, dqg, p.sdq[2], p.sdq[3], q0 + wrow, p.Nq, p.vec_dq);
}

}  // namespace armfast::cuda::flash
