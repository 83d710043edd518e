// The self-correlation attentions of the training-free baselines on the CPU, forward only:
// ClearCLIP softmax(s X X^T) V, NACLIP softmax(s X X^T + G) V with G a Gaussian of the two
// tokens' grid positions, SCLIP (softmax(s Q Q^T) + softmax(s K K^T)) V. Flash-style: one task per
// (batch*head, query tile) walks over the key tiles with an online softmax, and no N x N buffer.
//
// The tile is computed transposed, S^T = X_keys (s log2(e) X_queries)^T [keys, queries]:
//   - the query tile is packed once per task as [d, BQ] (the GEMM's vector operand), and the key
//     rows are read in place as the broadcast operand: no per-tile transpose or copy;
//   - the softmax runs down the columns, so its max, exp2 and sums are vector ops across queries;
//   - P V reads P^T as a strided broadcast operand and the value rows in place, and rescales the
//     accumulator by alpha = exp2(m_old - m_new) as it loads it (no separate pass);
//   - NACLIP's G is rf[row of key] * cf[col of key] with rf [h, BQ] and cf [w, BQ] built once
//     per task from the queries' (idx // w, idx % w): two vector loads and an FMA per key row.
// SCLIP's two operands share each value tile (one pass over V); ClearCLIP reads X alone (q = k).
// Every task writes its own rows of the output, so results do not depend on the thread count.
// Tasks are (batch*head, query tile) pairs, so B = 1 still feeds every thread. On a machine shared
// with other processes, OMP_WAIT_POLICY=passive stops idle OpenMP threads spinning on busy cores.
#include <algorithm>
#include <cmath>
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

constexpr int64_t kBlockQ = 64;   // queries per task: the columns of S^T (a multiple of every width)
constexpr int64_t kBlockK = 128;  // keys per tile: the rows of S^T (S^T 32 KiB, in L1 with qt)
constexpr int64_t kRowPad = 8;    // tiles' row counts are padded to this (a multiple of every R)
constexpr double kLog2e = 1.4426950408889634;

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// 2^x for x <= 127 (the softmax's s - max <= 0, in base 2), written without library calls so
// `omp simd` vectorises it: 2^x = 2^n 2^f with n = round(x), |f| <= 1/2, 2^f by its degree-6
// Taylor polynomial (within 1.3e-7 relative, about an ulp). x is clamped at -127 only, where the
// exponent field 0 makes the result exactly 0 (so -inf, the first tile's old max, gives 0); NaN
// passes the clamp (x < -127 is false) and the polynomial, so it comes out NaN as from std::exp2.
ARMFAST_INLINE float fast_exp2(float x) {
  const float xc = x < -127.0f ? -127.0f : x;
  const float shifted = xc + 12582912.0f;  // 1.5 * 2^23: round(xc) lands in the low mantissa
  const float n = shifted - 12582912.0f;
  const float f = xc - n;
  float p = 1.5403530393381608e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  // 2^n from the integer bits of `shifted` (0x4B400000 + n): no float-to-int conversion
  const int32_t bits = __builtin_bit_cast(int32_t, shifted) - (0x4B400000 - 127);
  return p * __builtin_bit_cast(float, bits << 23);
}
ARMFAST_INLINE double fast_exp2(double x) { return std::exp2(x); }

// C[M, N] = (diag(alpha) C if SCALED, else 0) + A[M, K] B[K, N]; M a multiple of kRowPad, N of the
// vector width. Narrow products (N <= NV/2 vectors: d = 32) take twice the rows per micro-tile,
// so that there are still R*NV independent accumulators to hide the FMA latency.
template <class Isa, bool SCALED, typename T>
ARMFAST_INLINE void tile_gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t sar,
                              int64_t sak, const T* b, int64_t ldb, T* c, int64_t ldc,
                              const T* alpha) {
  constexpr int R = Isa::R, NV = Isa::NV, W = Isa::VBYTES / sizeof(T);
  constexpr Start START = SCALED ? Start::scaled : Start::zero;
  static_assert(kRowPad % (2 * R) == 0, "row padding must suit both micro-tile heights");
  if (NV >= 2 && N <= (NV / 2) * W) {
    constexpr int R2 = 2 * R, NV2 = NV / 2 > 0 ? NV / 2 : 1;
    for (int64_t i = 0; i < M; i += R2) {
      const T* al = SCALED ? alpha + i : nullptr;
      if (N == NV2 * W)
        micro_tile<T, Isa, R2, NV2, START>(K, a + i * sar, sar, sak, b, ldb, c + i * ldc, ldc, al);
      else
        for (int64_t j = 0; j < N; j += W)
          micro_tile<T, Isa, R2, 1, START>(K, a + i * sar, sar, sak, b + j, ldb, c + i * ldc + j, ldc, al);
    }
    return;
  }
  for (int64_t i = 0; i < M; i += R) {
    const T* al = SCALED ? alpha + i : nullptr;
    int64_t j = 0;
    for (; j + NV * W <= N; j += NV * W)
      micro_tile<T, Isa, R, NV, START>(K, a + i * sar, sar, sak, b + j, ldb, c + i * ldc + j, ldc, al);
    for (; j < N; j += W)
      micro_tile<T, Isa, R, 1, START>(K, a + i * sar, sar, sak, b + j, ldb, c + i * ldc + j, ldc, al);
  }
}

template <typename T>
struct SelfCorrelationProblem {
  SelfCorrelationShape s;
  Strided<const T> x[2], v;  // x[1]: SCLIP's second operand
  Strided<T> out;
  T scale;  // s log2(e): scores in base 2
  // NACLIP: grid height, width, index of the first patch token (1 after a class token), and the
  // separable factors of log2(e) G = row_gauss[|dr|] * col_gauss[|dc|]
  int64_t grid_h, grid_w, first;
  const T *row_gauss, *col_gauss;
};

// Element counts of one task's workspace; `Workspace` carves them in this order.
struct WorkspaceSizes {
  int64_t qt, acc, st, keys, values, grid;
  int64_t total(int operands) const {
    return operands * (qt + acc + 3 * kBlockQ) + st + keys + values + grid;
  }
};

WorkspaceSizes workspace_sizes(int64_t d, int64_t dv, int64_t grid_cells) {
  return {d * kBlockQ, kBlockQ * dv, kBlockK * kBlockQ, kBlockK * d, kBlockK * dv,
          grid_cells * kBlockQ};
}

// One operand's state in a task: its query tile, accumulator and online-softmax state.
template <typename T>
struct OperandState {
  Slice<T> x;
  T *qt, *acc, *m, *l, *alpha;  // [d, BQ] s log2(e) x^T, [BQ, dv], [BQ] x 3
};

// qt[c, i] = f * x[q0 + i, c] for i < nq, 0 for nq <= i < BQ.
template <typename T>
ARMFAST_INLINE void pack_queries(T* qt, Slice<T> x, int64_t q0, int64_t nq, int64_t d, T f) {
  if (nq < kBlockQ)
    for (int64_t c = 0; c < d; ++c) std::fill(qt + c * kBlockQ + nq, qt + (c + 1) * kBlockQ, T(0));
  if (x.sn < x.sd) {
    for (int64_t c = 0; c < d; ++c)
      for (int64_t i = 0; i < nq; ++i) qt[c * kBlockQ + i] = f * x.at(q0 + i, c);
  } else {
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t c = 0; c < d; ++c) qt[c * kBlockQ + i] = f * x.at(q0 + i, c);
  }
}

// NACLIP's factors for the task's queries: rf[r, i] = row_gauss[|r - r_i|], cf[c, i] =
// col_gauss[|c - c_i|] for every grid row r and column c, 0 for the class token and padding.
template <typename T>
void grid_factors(const SelfCorrelationProblem<T>* P, int64_t q0, int64_t nq, T* rf, T* cf) {
  std::fill(rf, rf + (P->grid_h + P->grid_w) * kBlockQ, T(0));  // cf follows rf
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t p = q0 + i - P->first;
    if (p < 0) continue;
    const int64_t r = p / P->grid_w, c = p % P->grid_w;
    for (int64_t g = 0; g < P->grid_h; ++g) rf[g * kBlockQ + i] = P->row_gauss[g < r ? r - g : g - r];
    for (int64_t g = 0; g < P->grid_w; ++g) cf[g * kBlockQ + i] = P->col_gauss[g < c ? c - g : g - c];
  }
}

// The online softmax of one tile st [nk, BQ] (keys down, queries across; base 2), all vector ops
// across the queries: st becomes p = 2^(st + log2(e) G - m_new) (G: NACLIP's bias, BIAS), and m,
// l, alpha are updated column by column. With G (<= 1) the reference is max(st) + log2(e), a bound
// on st + log2(e) G taken without a pass that writes the biased scores: the exponentials stay
// <= 1, at most 2^-1.45 from those of the exact maximum, and the softmax does not depend on it.
template <bool BIAS, typename T>
ARMFAST_INLINE void online_softmax_columns(const SelfCorrelationProblem<T>* P, T* st, int64_t k0,
                                           int64_t nk, const T* rf, const T* cf, T* m, T* l,
                                           T* alpha) {
  alignas(64) T mx[kBlockQ], sum[kBlockQ];
  std::fill(mx, mx + kBlockQ, kNegInf<T>);
  for (int64_t j = 0; j < nk; ++j) {
    const T* row = st + j * kBlockQ;
#pragma omp simd
    for (int64_t i = 0; i < kBlockQ; ++i) mx[i] = row[i] > mx[i] ? row[i] : mx[i];
  }
  const T bound = BIAS ? static_cast<T>(kLog2e) : T(0);
#pragma omp simd
  for (int64_t i = 0; i < kBlockQ; ++i) {
    const T top = mx[i] + bound, mnew = top > m[i] ? top : m[i];
    alpha[i] = fast_exp2(m[i] - mnew);  // 0 on the first tile (m_old = -inf)
    m[i] = mnew;
    sum[i] = T(0);
  }
  for (int64_t j = 0; j < nk; ++j) {
    T* row = st + j * kBlockQ;
    const int64_t p = k0 + j - P->first;  // the key's patch index (< 0: the class token, G = 0)
    if (BIAS && p >= 0) {
      const T* gr = rf + (p / P->grid_w) * kBlockQ;
      const T* gc = cf + (p % P->grid_w) * kBlockQ;
#pragma omp simd
      for (int64_t i = 0; i < kBlockQ; ++i) {
        const T e = fast_exp2(row[i] + gr[i] * gc[i] - m[i]);
        row[i] = e;
        sum[i] += e;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < kBlockQ; ++i) {
        const T e = fast_exp2(row[i] - m[i]);
        row[i] = e;
        sum[i] += e;
      }
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < kBlockQ; ++i) l[i] = l[i] * alpha[i] + sum[i];
}

// Rows k0..k0+nk of a [N, d] slice as a GEMM operand with unit column stride: in place when the
// slice allows it and the padded rows exist, else copied into buf [rows, ld] (zero-padded).
template <typename T>
ARMFAST_INLINE const T* rows_operand(Slice<T> x, int64_t k0, int64_t nk, int64_t rows, int64_t d,
                                     int64_t ld, int64_t N, T* buf, int64_t* pitch) {
  if (x.sd == 1 && ld == d && k0 + rows <= N) {
    *pitch = x.sn;
    return x.p + k0 * x.sn;
  }
  copy_rows(buf, ld, x, k0, nk, rows, d, T(1));
  *pitch = ld;
  return buf;
}

// One (batch*head, query tile) task. DUAL: SCLIP's two operands; BIAS: NACLIP's G.
template <bool DUAL, bool BIAS>
struct SelfCorrelationTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const SelfCorrelationProblem<T>* P, int64_t bh, int64_t q0, T* ws) {
    constexpr int kOperands = DUAL ? 2 : 1;
    constexpr int64_t W = Isa::VBYTES / sizeof(T);
    const SelfCorrelationShape& s = P->s;
    const int64_t d = s.d, dv = round_up(d, W), b = bh / s.H, h = bh % s.H;
    const int64_t nq = min_of(kBlockQ, s.N - q0), rows = round_up(nq, kRowPad);
    const WorkspaceSizes z = workspace_sizes(d, dv, P->grid_h + P->grid_w);
    OperandState<T> op[kOperands];
    T* w = ws;
    for (OperandState<T>& a : op) {
      a.qt = w, w += z.qt;
      a.acc = w, w += z.acc;
      a.m = w, w += kBlockQ;
      a.l = w, w += kBlockQ;
      a.alpha = w, w += kBlockQ;
    }
    T* st = w;                  // [BK, BQ] S^T, then P^T
    T* keys = st + z.st;        // [BK, d]  key rows, when they cannot be read in place
    T* values = keys + z.keys;  // [BK, dv] value rows, likewise
    T* rf = values + z.values;  // [h, BQ], then cf [w, BQ]: NACLIP's factors
    T* cf = rf + P->grid_h * kBlockQ;
    for (int o = 0; o < kOperands; ++o) {
      OperandState<T>& a = op[o];
      a.x = slice(P->x[o], b, h);
      pack_queries(a.qt, a.x, q0, nq, d, P->scale);
      std::fill(a.acc, a.acc + rows * dv, T(0));
      std::fill(a.m, a.m + kBlockQ, kNegInf<T>);
      std::fill(a.l, a.l + kBlockQ, T(0));
    }
    if constexpr (BIAS) grid_factors(P, q0, nq, rf, cf);
    const Slice<T> vh = slice(P->v, b, h);
    for (int64_t k0 = 0; k0 < s.N; k0 += kBlockK) {
      const int64_t nk = min_of(kBlockK, s.N - k0), krows = round_up(nk, kRowPad);
      int64_t vpitch;
      const T* vt = rows_operand(vh, k0, nk, nk, d, dv, s.N, values, &vpitch);
      for (OperandState<T>& a : op) {
        int64_t kpitch;
        const T* kt = rows_operand(a.x, k0, nk, krows, d, d, s.N, keys, &kpitch);
        // S^T [krows, BQ] = keys [krows, d] * qt [d, BQ]; rows nk.. are never read
        tile_gemm<Isa, false>(krows, kBlockQ, d, kt, kpitch, int64_t(1), a.qt, kBlockQ, st,
                              kBlockQ, static_cast<const T*>(nullptr));
        online_softmax_columns<BIAS>(P, st, k0, nk, rf, cf, a.m, a.l, a.alpha);
        // acc [rows, dv] = diag(alpha) acc + P [rows, nk] V [nk, dv], P read from P^T
        tile_gemm<Isa, true>(rows, dv, nk, st, int64_t(1), kBlockQ, vt, vpitch, a.acc, dv, a.alpha);
      }
    }
    const Strided<T>& o = P->out;
    T* ob = o.data + b * o.stride[0] + h * o.stride[1];
    const int64_t se = o.stride[3];
    for (int64_t i = 0; i < nq; ++i) {
      T* orow = ob + (q0 + i) * o.stride[2];
      const T* a0 = op[0].acc + i * dv;
      const T inv0 = T(1) / op[0].l[i];
      if constexpr (DUAL) {
        const T* a1 = op[1].acc + i * dv;
        const T inv1 = T(1) / op[1].l[i];
        for (int64_t c = 0; c < d; ++c) orow[c * se] = a0[c] * inv0 + a1[c] * inv1;
      } else if (se == 1) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) orow[c] = a0[c] * inv0;
      } else {
        for (int64_t c = 0; c < d; ++c) orow[c * se] = a0[c] * inv0;
      }
    }
  }
};

double self_correlation_flops(const SelfCorrelationShape& s, int operands) {
  return 4.0 * operands * static_cast<double>(s.B * s.H) * static_cast<double>(s.N) *
         static_cast<double>(s.N) * static_cast<double>(s.d);
}

}  // namespace

template <typename T>
void self_correlation_forward(const SelfCorrelationShape& s, Strided<const T> x,
                              Strided<const T> x2, Strided<const T> v, Strided<T> out,
                              double scale, const GridBias* bias, int threads) {
  SelfCorrelationProblem<T> P{};
  P.s = s;
  P.x[0] = x, P.x[1] = x2, P.v = v, P.out = out;
  P.scale = static_cast<T>(scale * kLog2e);
  const bool dual = x2.data != nullptr;
  std::vector<T> row_gauss, col_gauss;
  if (bias != nullptr) {
    const double coef = -1.0 / (2.0 * bias->sigma * bias->sigma);
    for (int64_t i = 0; i < bias->h; ++i)
      row_gauss.push_back(static_cast<T>(kLog2e * std::exp(coef * i * i)));
    for (int64_t i = 0; i < bias->w; ++i) col_gauss.push_back(static_cast<T>(std::exp(coef * i * i)));
    P.grid_h = bias->h, P.grid_w = bias->w;
    P.first = bias->class_token ? 1 : 0;
    P.row_gauss = row_gauss.data(), P.col_gauss = col_gauss.data();
  }
  using Tile = void (*)(const SelfCorrelationProblem<T>*, int64_t, int64_t, T*);
  Tile tile = dual ? isa_kernel<SelfCorrelationTile<true, false>, const SelfCorrelationProblem<T>*,
                                int64_t, int64_t, T*>()
              : bias ? isa_kernel<SelfCorrelationTile<false, true>, const SelfCorrelationProblem<T>*,
                                  int64_t, int64_t, T*>()
                     : isa_kernel<SelfCorrelationTile<false, false>, const SelfCorrelationProblem<T>*,
                                  int64_t, int64_t, T*>();
  const int operands = dual ? 2 : 1;
  // sized for the widest vector, so one workspace suits every instruction set
  const WorkspaceSizes z = workspace_sizes(s.d, round_up(s.d, kMaxLanes<T>), P.grid_h + P.grid_w);
  run_tiles(tile, P, s.B * s.H, s.N, kBlockQ, z.total(operands),
            threads_for(threads, self_correlation_flops(s, operands)));
}

template void self_correlation_forward<float>(const SelfCorrelationShape&, Strided<const float>,
                                              Strided<const float>, Strided<const float>,
                                              Strided<float>, double, const GridBias*, int);
template void self_correlation_forward<double>(const SelfCorrelationShape&, Strided<const double>,
                                               Strided<const double>, Strided<const double>,
                                               Strided<double>, double, const GridBias*, int);

}  // namespace armfast::cpu
