// The attentions of the training-free baselines on the CPU, forward only: flash-style tiles with
// an online softmax, and no N x N (or n x n) buffer anywhere.
//
// self_correlation_forward: one task per (batch*head, query tile) walks over the key tiles of the
//   same operand X: softmax(s X X^T) V (ClearCLIP). NACLIP adds G = exp(-dist^2 / (2 sigma^2)) of
//   the two tokens' grid positions, computed per tile from the token indices. SCLIP's operands Q
//   and K run in the same pass: two score tiles, two online-softmax states, two accumulators, and
//   each V tile copied once for both.
// masked_affinity_forward (ProxyCLIP): a first O(n C) pass takes each feature row's inverse norm
//   and mean(S) = |mean_i f_i / |f_i||^2 per image. One task per (batch, query tile) then walks
//   over the key tiles: S from the normalised features, S < beta mean(S) masked (never the
//   diagonal), softmax(gamma S) online, applied to all heads at once (V seen as [n, H*d]), since
//   the map is shared by every head.
//
// Every task writes its own rows of the output, so results do not depend on the thread count.
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

constexpr int64_t kBlockQ = 64;  // query rows per tile (a multiple of every Isa::R)
constexpr int64_t kBlockK = 64;  // keys per tile (a multiple of every vector width)
// The affinity kernel's wide products (S over C = 768 features, P V over H*d = 768 columns) run
// in slices of kChunk, so the slice of the right operand stays in L1 across the row blocks.
constexpr int64_t kChunk = 64;
constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// ---- self-correlation: ClearCLIP, SCLIP, NACLIP ------------------------------------------------

template <typename T>
struct SelfCorrelationProblem {
  SelfCorrelationShape s;
  Strided<const T> x[2], v;  // x[1]: SCLIP's second operand
  Strided<T> out;
  T scale;
  int64_t dp;  // d rounded up to the widest vector: row length of padded local tiles
  // NACLIP: grid height, width, index of the first patch token (1 after a class token), and the
  // separable factors of G: exp(-(dr^2 + dc^2) / (2 sigma^2)) = row_gauss[|dr|] * col_gauss[|dc|]
  int64_t grid_h, grid_w, first;
  const T *row_gauss, *col_gauss;
};

// NACLIP's G for one query row: its factors over every grid row (rf[0:h]) and column (cf[0:w]),
// or false for the class token (G = 0 on its row).
template <typename T>
ARMFAST_INLINE bool grid_factors(const SelfCorrelationProblem<T>* P, int64_t token, T* rf, T* cf) {
  const int64_t p = token - P->first;
  if (p < 0) return false;
  const int64_t r = p / P->grid_w, c = p % P->grid_w;
  for (int64_t i = 0; i < P->grid_h; ++i) rf[i] = P->row_gauss[i < r ? r - i : i - r];
  for (int64_t i = 0; i < P->grid_w; ++i) cf[i] = P->col_gauss[i < c ? c - i : i - c];
  return true;
}

// srow[j] += G(query, key k0 + j) for j < nk. The keys of a tile cover a few grid rows; along
// each row's run of columns G is rf[row] times a contiguous slice of cf: one vector FMA per key.
template <typename T>
ARMFAST_INLINE void add_grid_bias(const SelfCorrelationProblem<T>* P, T* srow, int64_t k0, int64_t nk,
                                  const T* rf, const T* cf) {
  int64_t j = std::max<int64_t>(0, P->first - k0);  // class-token columns of G are 0
  while (j < nk) {
    const int64_t p = k0 + j - P->first, r = p / P->grid_w, c = p % P->grid_w;
    const int64_t run = min_of(P->grid_w - c, nk - j);
    const T g = rf[r];
    T* dst = srow + j;
    const T* src = cf + c;
#pragma omp simd
    for (int64_t t = 0; t < run; ++t) dst[t] += g * src[t];
    j += run;
  }
}

int64_t self_correlation_workspace(int64_t d, int64_t dp, int operands, int64_t grid_cells) {
  return operands * (kBlockQ * d + d * kBlockK + kBlockQ * kBlockK + kBlockQ * dp + 2 * kBlockQ) +
         kBlockK * dp + kBlockQ * grid_cells + kBlockQ;
}

// One (batch*head, query tile) task. DUAL: SCLIP's two operands; BIAS: NACLIP's G.
template <bool DUAL, bool BIAS>
struct SelfCorrelationTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const SelfCorrelationProblem<T>* P, int64_t bh, int64_t q0, T* ws) {
    constexpr int kOperands = DUAL ? 2 : 1;
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const SelfCorrelationShape& s = P->s;
    const int64_t d = s.d, dp = P->dp, b = bh / s.H, h = bh % s.H;
    const int64_t nq = min_of(kBlockQ, s.N - q0), rows = round_up(nq, R);
    struct Operand {
      Slice<T> x;
      T *xs, *xt, *sc, *acc, *m, *l;  // [BQ,d] scale*x, [d,BK] x^T, [BQ,BK], [BQ,dp], [BQ], [BQ]
    } op[kOperands];
    T* w = ws;
    for (int o = 0; o < kOperands; ++o) {
      Operand& a = op[o];
      a.x = slice(P->x[o], b, h);
      a.xs = w, w += kBlockQ * d;
      a.xt = w, w += d * kBlockK;
      a.sc = w, w += kBlockQ * kBlockK;
      a.acc = w, w += kBlockQ * dp;
      a.m = w, w += kBlockQ;
      a.l = w, w += kBlockQ;
      copy_rows(a.xs, d, a.x, q0, nq, rows, d, P->scale);
      std::fill(a.acc, a.acc + rows * dp, T(0));
      std::fill(a.m, a.m + rows, kNegInf<T>);
      std::fill(a.l, a.l + rows, T(0));
    }
    T* vs = w;  // [BK, dp] v, shared by both operands
    // BIAS: per query row, G's factors over the grid rows and columns, and whether it is a patch
    const int64_t cells = P->grid_h + P->grid_w;
    T* factors = vs + kBlockK * dp;    // [BQ, h + w]
    T* patch = factors + kBlockQ * cells;  // [BQ]
    if constexpr (BIAS)
      for (int64_t i = 0; i < nq; ++i)
        patch[i] = grid_factors(P, q0 + i, factors + i * cells, factors + i * cells + P->grid_h);
    const Slice<T> vh = slice(P->v, b, h);
    for (int64_t k0 = 0; k0 < s.N; k0 += kBlockK) {
      const int64_t nk = min_of(kBlockK, s.N - k0), cols = round_up(nk, W);
      copy_rows(vs, dp, vh, k0, nk, nk, d, T(1));
      for (Operand& a : op) {
        copy_transposed(a.xt, kBlockK, a.x, k0, nk, cols, d, T(1));
        gemm<T, Isa>(rows, cols, d, a.xs, d, a.xt, kBlockK, a.sc, kBlockK, false);
        for (int64_t i = 0; i < nq; ++i) {
          T* srow = a.sc + i * kBlockK;
          if constexpr (BIAS)
            if (patch[i] != T(0))
              add_grid_bias(P, srow, k0, nk, factors + i * cells, factors + i * cells + P->grid_h);
          const T alpha = online_softmax_row(srow, nk, cols, a.m[i], a.l[i]);
          T* orow = a.acc + i * dp;
#pragma omp simd
          for (int64_t c = 0; c < dp; ++c) orow[c] *= alpha;
        }
        // Rows nq..rows of sc are zero (zero-padded x) and add nothing.
        gemm<T, Isa>(rows, dp, nk, a.sc, kBlockK, vs, dp, a.acc, dp, true);
      }
    }
    const Strided<T>& o = P->out;
    T* ob = o.data + b * o.stride[0] + h * o.stride[1];
    for (int64_t i = 0; i < nq; ++i) {
      T* orow = ob + (q0 + i) * o.stride[2];
      const T inv0 = T(1) / op[0].l[i];
      if constexpr (DUAL) {
        const T inv1 = T(1) / op[1].l[i];
        for (int64_t c = 0; c < d; ++c)
          orow[c * o.stride[3]] = op[0].acc[i * dp + c] * inv0 + op[1].acc[i * dp + c] * inv1;
      } else {
        for (int64_t c = 0; c < d; ++c) orow[c * o.stride[3]] = op[0].acc[i * dp + c] * inv0;
      }
    }
  }
};

double self_correlation_flops(const SelfCorrelationShape& s, int operands) {
  return 4.0 * operands * static_cast<double>(s.B * s.H) * static_cast<double>(s.N) *
         static_cast<double>(s.N) * static_cast<double>(s.d);
}

// ---- masked affinity: ProxyCLIP ----------------------------------------------------------------

template <typename T>
struct AffinityProblem {
  AffinityShape s;
  Slice<T> f;  // batch 0 of f [B, n, C]; batch b starts at f.p + b * fb
  int64_t fb;
  Strided<const T> v;
  Strided<T> out;
  const T* rnorm;   // [B * n] 1 / max(|f_i|, eps)
  const T* thresh;  // [B] beta * mean(S)
  T gamma;
  int64_t hd, hdp;  // H * d, and rounded up to the widest vector
};

int64_t affinity_workspace(int64_t C, int64_t hdp) {
  return kBlockQ * C + C * kBlockK + kBlockK * hdp + kBlockQ * kBlockK + kBlockQ * hdp + 2 * kBlockQ;
}

// dst[i * ld + c] (transposed: dst[c * ld + i]) = src[n0 + i, c] * r[n0 + i] for i < n, c < C,
// looping along the source's smaller stride.
template <typename T, bool TRANSPOSED>
ARMFAST_INLINE void copy_normalized(T* dst, int64_t ld, Slice<T> src, const T* r, int64_t n0,
                                    int64_t n, int64_t C) {
  auto put = [&](int64_t i, int64_t c) {
    dst[TRANSPOSED ? c * ld + i : i * ld + c] = src.at(n0 + i, c) * r[n0 + i];
  };
  if (src.sn < src.sd) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < n; ++i) put(i, c);
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < C; ++c) put(i, c);
  }
}

// One (batch, query tile) task.
struct AffinityTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const AffinityProblem<T>* P, int64_t b, int64_t q0, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const AffinityShape& s = P->s;
    const int64_t C = s.C, d = s.d, hdp = P->hdp, n = s.n;
    const int64_t nq = min_of(kBlockQ, n - q0), rows = round_up(nq, R);
    T* fs = ws;                       // [BQ, C]   normalised query features
    T* ft = fs + kBlockQ * C;         // [C, BK]   normalised key features, transposed
    T* vs = ft + C * kBlockK;         // [BK, hdp] v of every head side by side
    T* sc = vs + kBlockK * hdp;       // [BQ, BK]  S, then probabilities
    T* acc = sc + kBlockQ * kBlockK;  // [BQ, hdp] unnormalised output of every head
    T* mrow = acc + kBlockQ * hdp;    // [BQ]
    T* lrow = mrow + kBlockQ;         // [BQ]
    const Slice<T> f{P->f.p + b * P->fb, P->f.sn, P->f.sd};
    const T* rn = P->rnorm + b * n;
    const T thresh = P->thresh[b], gamma = P->gamma;
    copy_normalized<T, false>(fs, C, f, rn, q0, nq, C);
    std::fill(fs + nq * C, fs + rows * C, T(0));
    std::fill(acc, acc + rows * hdp, T(0));
    std::fill(mrow, mrow + rows, kNegInf<T>);
    std::fill(lrow, lrow + rows, T(0));
    for (int64_t j = 0; j < kBlockK; ++j) std::fill(vs + j * hdp + P->hd, vs + (j + 1) * hdp, T(0));
    for (int64_t k0 = 0; k0 < n; k0 += kBlockK) {
      const int64_t nk = min_of(kBlockK, n - k0), cols = round_up(nk, W);
      copy_normalized<T, true>(ft, kBlockK, f, rn, k0, nk, C);
      for (int64_t c = 0; c < C; ++c) std::fill(ft + c * kBlockK + nk, ft + c * kBlockK + cols, T(0));
      for (int64_t h = 0; h < s.H; ++h) {
        const Slice<T> vh = slice(P->v, b, h);
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t e = 0; e < d; ++e) vs[j * hdp + h * d + e] = vh.at(k0 + j, e);
      }
      for (int64_t c0 = 0; c0 < C; c0 += kChunk)
        gemm<T, Isa>(rows, cols, min_of(kChunk, C - c0), fs + c0, C, ft + c0 * kBlockK, kBlockK,
                     sc, kBlockK, c0 > 0);
      for (int64_t i = 0; i < nq; ++i) {
        T* srow = sc + i * kBlockK;
        const int64_t diagonal = q0 + i - k0;  // the key index of S_ii in this tile, if any
#pragma omp simd
        for (int64_t j = 0; j < nk; ++j)
          srow[j] = srow[j] >= thresh || j == diagonal ? gamma * srow[j] : kNegInf<T>;
        const T alpha = online_softmax_row(srow, nk, cols, mrow[i], lrow[i]);
        T* orow = acc + i * hdp;
#pragma omp simd
        for (int64_t c = 0; c < hdp; ++c) orow[c] *= alpha;
      }
      // Rows nq..rows of sc are zero (zero-padded features) and add nothing.
      for (int64_t c0 = 0; c0 < hdp; c0 += kChunk)
        gemm<T, Isa>(rows, min_of(kChunk, hdp - c0), nk, sc, kBlockK, vs + c0, hdp, acc + c0, hdp,
                     true);
    }
    const Strided<T>& o = P->out;
    for (int64_t h = 0; h < s.H; ++h) {
      T* ob = o.data + b * o.stride[0] + h * o.stride[1];
      for (int64_t i = 0; i < nq; ++i) {
        const T inv = T(1) / lrow[i];  // >= 1 term: the diagonal is never masked
        T* orow = ob + (q0 + i) * o.stride[2];
        for (int64_t e = 0; e < d; ++e) orow[e * o.stride[3]] = acc[i * hdp + h * d + e] * inv;
      }
    }
  }
};

// The O(n C) first pass: rnorm[b*n + i] = 1 / max(|f_bi|, eps) and thresh[b] = beta * mean(S),
// mean(S) = |mean_i f_bi rnorm_bi|^2 (the mean of all n x n cosines), accumulated in double.
template <typename T>
void affinity_first_pass(const AffinityProblem<T>& P, double beta, std::vector<T>* rnorm,
                         std::vector<T>* thresh, int threads) {
  const AffinityShape& s = P.s;
  const int64_t rows = s.B * s.n, chunks = (s.C + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = P.f.p + (r / s.n) * P.fb + (r % s.n) * P.f.sn;
    double sum = 0;
    for (int64_t c = 0; c < s.C; ++c) sum += static_cast<double>(row[c * P.f.sd]) * row[c * P.f.sd];
    (*rnorm)[r] = static_cast<T>(1.0 / std::max(std::sqrt(sum), kNormEps));
  }
  // |sum_i f_i r_i|^2 per (batch, chunk of features), then summed per batch in a fixed order.
  std::vector<double> partial(static_cast<size_t>(s.B * chunks));
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t t = 0; t < s.B * chunks; ++t) {
    const int64_t b = t / chunks, c0 = (t % chunks) * kChunk, nc = std::min(kChunk, s.C - c0);
    double mean[kChunk] = {};
    for (int64_t i = 0; i < s.n; ++i) {
      const T* row = P.f.p + b * P.fb + i * P.f.sn;
      const double r = (*rnorm)[b * s.n + i];
      for (int64_t c = 0; c < nc; ++c) mean[c] += r * row[(c0 + c) * P.f.sd];
    }
    double sq = 0;
    for (int64_t c = 0; c < nc; ++c) sq += mean[c] * mean[c];
    partial[t] = sq;
  }
  for (int64_t b = 0; b < s.B; ++b) {
    double sq = 0;
    for (int64_t c = 0; c < chunks; ++c) sq += partial[b * chunks + c];
    (*thresh)[b] = static_cast<T>(beta * sq / (static_cast<double>(s.n) * s.n));
  }
}

}  // namespace

template <typename T>
void self_correlation_forward(const SelfCorrelationShape& s, Strided<const T> x,
                              Strided<const T> x2, Strided<const T> v, Strided<T> out,
                              double scale, const GridBias* bias, int threads) {
  SelfCorrelationProblem<T> P{};
  P.s = s;
  P.x[0] = x, P.x[1] = x2, P.v = v, P.out = out;
  P.scale = static_cast<T>(scale);
  P.dp = round_up(s.d, kMaxLanes<T>);
  const bool dual = x2.data != nullptr;
  std::vector<T> row_gauss, col_gauss;
  if (bias != nullptr) {
    const double coef = -1.0 / (2.0 * bias->sigma * bias->sigma);
    for (int64_t i = 0; i < bias->h; ++i) row_gauss.push_back(static_cast<T>(std::exp(coef * i * i)));
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
  run_tiles(tile, P, s.B * s.H, s.N, kBlockQ,
            self_correlation_workspace(s.d, P.dp, operands, P.grid_h + P.grid_w),
            threads_for(threads, self_correlation_flops(s, operands)));
}

template <typename T>
void masked_affinity_forward(const AffinityShape& s, Strided<const T> f, Strided<const T> v,
                             Strided<T> out, double beta, double gamma, int threads) {
  AffinityProblem<T> P{};
  P.s = s;
  P.f = {f.data, f.stride[1], f.stride[2]};
  P.fb = f.stride[0];
  P.v = v, P.out = out;
  P.gamma = static_cast<T>(gamma);
  P.hd = s.H * s.d;
  P.hdp = round_up(P.hd, kMaxLanes<T>);
  const double flops = 2.0 * static_cast<double>(s.B) * static_cast<double>(s.n) *
                       static_cast<double>(s.n) * static_cast<double>(s.C + P.hd);
  const int nthreads = threads_for(threads, flops);
  std::vector<T> rnorm(static_cast<size_t>(s.B * s.n)), thresh(static_cast<size_t>(s.B));
  affinity_first_pass(P, beta, &rnorm, &thresh, nthreads);
  P.rnorm = rnorm.data();
  P.thresh = thresh.data();
  auto tile = isa_kernel<AffinityTile, const AffinityProblem<T>*, int64_t, int64_t, T*>();
  run_tiles(tile, P, s.B, s.n, kBlockQ, affinity_workspace(s.C, P.hdp), nthreads);
}

#define ARMFAST_INSTANTIATE(T)                                                                     \
  template void self_correlation_forward<T>(const SelfCorrelationShape&, Strided<const T>,         \
                                            Strided<const T>, Strided<const T>, Strided<T>, double, \
                                            const GridBias*, int);                                 \
  template void masked_affinity_forward<T>(const AffinityShape&, Strided<const T>, Strided<const T>, \
                                           Strided<T>, double, double, int);
ARMFAST_INSTANTIATE(float)
ARMFAST_INSTANTIATE(double)
#undef ARMFAST_INSTANTIATE

}  // namespace armfast::cpu
