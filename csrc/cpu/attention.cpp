// Flash attention on the CPU: forward and backward without the Nq x Nk score matrix.
//
// Forward: for each (batch, head, query tile), loop over key tiles with an online softmax
// (running row max m and sum l, accumulator rescaled by exp(m_old - m_new)); save the row
// log-sum-exp. Backward recomputes P = exp(S - lse) tile by tile with delta = rowsum(dO * O):
// one pass owns a key tile and loops over queries (dK, dV), another owns a query tile and loops
// over keys (dQ). Every output element is written by exactly one task: no atomics, and results do
// not depend on the thread count or schedule.
//
// Tiles of the strided inputs are copied into contiguous, zero-padded local buffers (transposed
// where the GEMM micro-kernel wants it), so the inner loops run on unit-stride rows whatever the
// input strides. q is pre-multiplied by the softmax scale while being copied.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "isa.h"
#include "kernels.h"
#include "parallel.h"
#include "simd.h"
#include "tiles.h"

namespace armfast::cpu {
namespace {

constexpr int64_t kBlockQ = 64;  // query rows per tile (a multiple of every Isa::R)
constexpr int64_t kBlockK = 64;  // keys per tile (a multiple of every vector width)

template <typename T>
struct Problem {
  AttentionShape s;
  Strided<const T> q, k, v, out, lse, dout;  // inputs (out, lse, dout: backward only)
  Strided<T> out_w, lse_w, dq, dk, dv;       // outputs (out_w, lse_w: forward only)
  const T* delta;  // [B*H*Nq] rowsum(dO * O), backward only
  T scale;
  int64_t dp;  // d rounded up to the widest vector: row length of padded local tiles
};

// ---- forward: one (batch*head, query tile) task ------------------------------------------------
int64_t forward_workspace(int64_t d, int64_t dp) {
  return kBlockQ * d + d * kBlockK + kBlockK * dp + kBlockQ * kBlockK + kBlockQ * dp + 2 * kBlockQ;
}

struct ForwardTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t bh, int64_t q0, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const AttentionShape& s = P->s;
    const int64_t d = s.d, dp = P->dp, b = bh / s.H, h = bh % s.H;
    const int64_t nq = min_of(kBlockQ, s.Nq - q0), rows = round_up(nq, R);
    T* qs = ws;                            // [BQ, d]   scale * q
    T* kt = qs + kBlockQ * d;              // [d, BK]   k^T
    T* vs = kt + d * kBlockK;              // [BK, dp]  v
    T* sc = vs + kBlockK * dp;             // [BQ, BK]  scores, then probabilities
    T* acc = sc + kBlockQ * kBlockK;       // [BQ, dp]  unnormalised output
    T* mrow = acc + kBlockQ * dp;          // [BQ]      running max
    T* lrow = mrow + kBlockQ;              // [BQ]      running sum of exp(s - m)
    copy_rows(qs, d, slice(P->q, b, h), q0, nq, rows, d, P->scale);
    std::fill(acc, acc + rows * dp, T(0));
    std::fill(mrow, mrow + rows, -std::numeric_limits<T>::infinity());
    std::fill(lrow, lrow + rows, T(0));
    const Slice<T> kh = slice(P->k, b, h), vh = slice(P->v, b, h);
    for (int64_t k0 = 0; k0 < s.Nk; k0 += kBlockK) {
      const int64_t nk = min_of(kBlockK, s.Nk - k0), cols = round_up(nk, W);
      copy_transposed(kt, kBlockK, kh, k0, nk, cols, d, T(1));
      copy_rows(vs, dp, vh, k0, nk, nk, d, T(1));
      gemm<T, Isa>(rows, cols, d, qs, d, kt, kBlockK, sc, kBlockK, false);
      for (int64_t i = 0; i < nq; ++i) {
        const T alpha = online_softmax_row(sc + i * kBlockK, nk, cols, mrow[i], lrow[i]);
        T* orow = acc + i * dp;
#pragma omp simd
        for (int64_t c = 0; c < dp; ++c) orow[c] *= alpha;
      }
      gemm<T, Isa>(rows, dp, nk, sc, kBlockK, vs, dp, acc, dp, true);
    }
    const Strided<T>& o = P->out_w;
    T* ob = o.data + b * o.stride[0] + h * o.stride[1];
    T* lb = P->lse_w.data + b * P->lse_w.stride[0] + h * P->lse_w.stride[1];
    for (int64_t i = 0; i < nq; ++i) {
      const T inv = T(1) / lrow[i];
      T* orow = ob + (q0 + i) * o.stride[2];
      for (int64_t c = 0; c < d; ++c) orow[c * o.stride[3]] = acc[i * dp + c] * inv;
      lb[(q0 + i) * P->lse_w.stride[2]] = mrow[i] + std::log(lrow[i]);
    }
  }
};

// ---- backward, dK and dV: one (batch*head, key tile) task, looping over query tiles ------------
int64_t backward_kv_workspace(int64_t d, int64_t dp) {
  return 2 * kBlockK * d + 2 * kBlockK * dp + 2 * d * kBlockQ + 2 * kBlockQ * dp + 2 * kBlockQ +
         2 * kBlockK * kBlockQ;
}

struct BackwardKVTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t bh, int64_t k0, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const AttentionShape& s = P->s;
    const int64_t d = s.d, dp = P->dp, b = bh / s.H, h = bh % s.H;
    const int64_t nk = min_of(kBlockK, s.Nk - k0), rows = round_up(nk, R);
    T* ks = ws;                        // [BK, d]   k
    T* vs = ks + kBlockK * d;          // [BK, d]   v
    T* dk = vs + kBlockK * d;          // [BK, dp]  sum_i dS[i, j] * scale * q_i
    T* dv = dk + kBlockK * dp;         // [BK, dp]  sum_i P[i, j] * dO_i
    T* qt = dv + kBlockK * dp;         // [d, BQ]   (scale * q)^T
    T* dot = qt + d * kBlockQ;         // [d, BQ]   dO^T
    T* qs = dot + d * kBlockQ;         // [BQ, dp]  scale * q
    T* dos = qs + kBlockQ * dp;        // [BQ, dp]  dO
    T* lse = dos + kBlockQ * dp;       // [BQ]
    T* del = lse + kBlockQ;            // [BQ]
    T* pt = del + kBlockQ;             // [BK, BQ]  S^T, then P^T
    T* dpt = pt + kBlockK * kBlockQ;   // [BK, BQ]  dP^T, then dS^T
    copy_rows(ks, d, slice(P->k, b, h), k0, nk, rows, d, T(1));
    copy_rows(vs, d, slice(P->v, b, h), k0, nk, rows, d, T(1));
    std::fill(dk, dk + rows * dp, T(0));
    std::fill(dv, dv + rows * dp, T(0));
    const Slice<T> qh = slice(P->q, b, h), doh = slice(P->dout, b, h);
    const T* lse_h = P->lse.data + b * P->lse.stride[0] + h * P->lse.stride[1];
    const T* del_h = P->delta + bh * s.Nq;
    for (int64_t q0 = 0; q0 < s.Nq; q0 += kBlockQ) {
      const int64_t nq = min_of(kBlockQ, s.Nq - q0), cols = round_up(nq, W);
      copy_transposed(qt, kBlockQ, qh, q0, nq, cols, d, P->scale);
      copy_transposed(dot, kBlockQ, doh, q0, nq, cols, d, T(1));
      copy_rows(qs, dp, qh, q0, nq, nq, d, P->scale);
      copy_rows(dos, dp, doh, q0, nq, nq, d, T(1));
      for (int64_t i = 0; i < nq; ++i) {
        lse[i] = lse_h[(q0 + i) * P->lse.stride[2]];
        del[i] = del_h[q0 + i];
      }
      gemm<T, Isa>(rows, cols, d, ks, d, qt, kBlockQ, pt, kBlockQ, false);
      gemm<T, Isa>(rows, cols, d, vs, d, dot, kBlockQ, dpt, kBlockQ, false);
      for (int64_t j = 0; j < nk; ++j) {
        T* prow = pt + j * kBlockQ;
        T* drow = dpt + j * kBlockQ;
#pragma omp simd
        for (int64_t i = 0; i < nq; ++i) {
          const T p = fast_exp(prow[i] - lse[i]);
          prow[i] = p;
          drow[i] = p * (drow[i] - del[i]);
        }
      }
      // Rows nk..rows of pt/dpt hold zeros (zero-padded k, v), so they add nothing below.
      gemm<T, Isa>(rows, dp, nq, pt, kBlockQ, dos, dp, dv, dp, true);
      gemm<T, Isa>(rows, dp, nq, dpt, kBlockQ, qs, dp, dk, dp, true);
    }
    const Strided<T>& gk = P->dk;
    const Strided<T>& gv = P->dv;
    T* dkb = gk.data + b * gk.stride[0] + h * gk.stride[1];
    T* dvb = gv.data + b * gv.stride[0] + h * gv.stride[1];
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t c = 0; c < d; ++c) {
        dkb[(k0 + j) * gk.stride[2] + c * gk.stride[3]] = dk[j * dp + c];
        dvb[(k0 + j) * gv.stride[2] + c * gv.stride[3]] = dv[j * dp + c];
      }
  }
};

// ---- backward, dQ: one (batch*head, query tile) task, looping over key tiles -------------------
int64_t backward_q_workspace(int64_t d, int64_t dp) {
  return 2 * kBlockQ * d + kBlockQ * dp + 2 * kBlockQ + 2 * d * kBlockK + kBlockK * dp +
         2 * kBlockQ * kBlockK;
}

struct BackwardQTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t bh, int64_t q0, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const AttentionShape& s = P->s;
    const int64_t d = s.d, dp = P->dp, b = bh / s.H, h = bh % s.H;
    const int64_t nq = min_of(kBlockQ, s.Nq - q0), rows = round_up(nq, R);
    T* qs = ws;                        // [BQ, d]   scale * q
    T* dos = qs + kBlockQ * d;         // [BQ, d]   dO
    T* dq = dos + kBlockQ * d;         // [BQ, dp]  sum_j dS[i, j] k_j
    T* lse = dq + kBlockQ * dp;        // [BQ]
    T* del = lse + kBlockQ;            // [BQ]
    T* kt = del + kBlockQ;             // [d, BK]   k^T
    T* vt = kt + d * kBlockK;          // [d, BK]   v^T
    T* ks = vt + d * kBlockK;          // [BK, dp]  k
    T* sc = ks + kBlockK * dp;         // [BQ, BK]  S, then P, then dS
    T* dps = sc + kBlockQ * kBlockK;   // [BQ, BK]  dP
    const Slice<T> qh = slice(P->q, b, h), doh = slice(P->dout, b, h);
    copy_rows(qs, d, qh, q0, nq, rows, d, P->scale);
    copy_rows(dos, d, doh, q0, nq, rows, d, T(1));
    std::fill(dq, dq + rows * dp, T(0));
    const T* lse_h = P->lse.data + b * P->lse.stride[0] + h * P->lse.stride[1];
    for (int64_t i = 0; i < nq; ++i) {
      lse[i] = lse_h[(q0 + i) * P->lse.stride[2]];
      del[i] = P->delta[bh * s.Nq + q0 + i];
    }
    const Slice<T> kh = slice(P->k, b, h), vh = slice(P->v, b, h);
    for (int64_t k0 = 0; k0 < s.Nk; k0 += kBlockK) {
      const int64_t nk = min_of(kBlockK, s.Nk - k0), cols = round_up(nk, W);
      copy_transposed(kt, kBlockK, kh, k0, nk, cols, d, T(1));
      copy_transposed(vt, kBlockK, vh, k0, nk, cols, d, T(1));
      copy_rows(ks, dp, kh, k0, nk, nk, d, T(1));
      gemm<T, Isa>(rows, cols, d, qs, d, kt, kBlockK, sc, kBlockK, false);
      gemm<T, Isa>(rows, cols, d, dos, d, vt, kBlockK, dps, kBlockK, false);
      for (int64_t i = 0; i < nq; ++i) {
        T* srow = sc + i * kBlockK;
        const T* drow = dps + i * kBlockK;
        const T l = lse[i], dl = del[i];
#pragma omp simd
        for (int64_t j = 0; j < nk; ++j) srow[j] = fast_exp(srow[j] - l) * (drow[j] - dl);
      }
      // Rows nq..rows of sc are zero (zero-padded q, dO) and add nothing below.
      gemm<T, Isa>(rows, dp, nk, sc, kBlockK, ks, dp, dq, dp, true);
    }
    const Strided<T>& g = P->dq;
    T* dqb = g.data + b * g.stride[0] + h * g.stride[1];
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t c = 0; c < d; ++c)
        dqb[(q0 + i) * g.stride[2] + c * g.stride[3]] = dq[i * dp + c] * P->scale;
  }
};

double attention_flops(const AttentionShape& s) {
  return 4.0 * static_cast<double>(s.B * s.H) * static_cast<double>(s.Nq) *
         static_cast<double>(s.Nk) * static_cast<double>(s.d);
}

}  // namespace

template <typename T>
void attention_forward(const AttentionShape& s, Strided<const T> q, Strided<const T> k,
                       Strided<const T> v, Strided<T> out, Strided<T> lse, double scale,
                       int threads) {
  Problem<T> P{};
  P.s = s;
  P.q = q, P.k = k, P.v = v, P.out_w = out, P.lse_w = lse;
  P.scale = static_cast<T>(scale);
  P.dp = round_up(s.d, kMaxLanes<T>);
  auto tile = isa_kernel<ForwardTile, const Problem<T>*, int64_t, int64_t, T*>();
  run_tiles(tile, P, s.B * s.H, s.Nq, kBlockQ, forward_workspace(s.d, P.dp),
               threads_for(threads, attention_flops(s)));
}

template <typename T>
void attention_backward(const AttentionShape& s, Strided<const T> dout, Strided<const T> q,
                        Strided<const T> k, Strided<const T> v, Strided<const T> out,
                        Strided<const T> lse, Strided<T> dq, Strided<T> dk, Strided<T> dv,
                        double scale, int threads) {
  Problem<T> P{};
  P.s = s;
  P.q = q, P.k = k, P.v = v, P.out = out, P.lse = lse, P.dout = dout;
  P.dq = dq, P.dk = dk, P.dv = dv;
  P.scale = static_cast<T>(scale);
  P.dp = round_up(s.d, kMaxLanes<T>);
  const int nthreads = threads_for(threads, 2.5 * attention_flops(s));

  // delta = rowsum(dO * O), which equals rowsum(P * dP), accumulated in double.
  std::vector<T> delta(static_cast<size_t>(s.B * s.H * s.Nq));
  const int64_t nrows = s.B * s.H * s.Nq;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t i = r % s.Nq, bh = r / s.Nq, b = bh / s.H, h = bh % s.H;
    const T* g = dout.data + b * dout.stride[0] + h * dout.stride[1] + i * dout.stride[2];
    const T* o = out.data + b * out.stride[0] + h * out.stride[1] + i * out.stride[2];
    double acc = 0;
    for (int64_t c = 0; c < s.d; ++c)
      acc += static_cast<double>(g[c * dout.stride[3]]) * static_cast<double>(o[c * out.stride[3]]);
    delta[r] = static_cast<T>(acc);
  }
  P.delta = delta.data();

  auto kv = isa_kernel<BackwardKVTile, const Problem<T>*, int64_t, int64_t, T*>();
  run_tiles(kv, P, s.B * s.H, s.Nk, kBlockK, backward_kv_workspace(s.d, P.dp), nthreads);
  auto qtile = isa_kernel<BackwardQTile, const Problem<T>*, int64_t, int64_t, T*>();
  run_tiles(qtile, P, s.B * s.H, s.Nq, kBlockQ, backward_q_workspace(s.d, P.dp), nthreads);
}

#define ARMFAST_INSTANTIATE(T)                                                                   \
  template void attention_forward<T>(const AttentionShape&, Strided<const T>, Strided<const T>,  \
                                     Strided<const T>, Strided<T>, Strided<T>, double, int);     \
  template void attention_backward<T>(const AttentionShape&, Strided<const T>, Strided<const T>, \
                                      Strided<const T>, Strided<const T>, Strided<const T>,      \
                                      Strided<const T>, Strided<T>, Strided<T>, Strided<T>,      \
                                      double, int);
ARMFAST_INSTANTIATE(float)
ARMFAST_INSTANTIATE(double)
#undef ARMFAST_INSTANTIATE

}  // namespace armfast::cpu
