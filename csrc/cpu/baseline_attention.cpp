// The attentions of the training-free baselines on the CPU, forward only: flash-style tiles with
// an online softmax, and no N x N (or n x n) buffer anywhere.
//
// self_correlation_forward: one task per (batch*head, query tile) walks over the key tiles of the
//   same operand X: softmax(s X X^T) V (ClearCLIP). NACLIP adds G = exp(-dist^2 / (2 sigma^2)) of
//   the two tokens' grid positions, computed per tile from the token indices. SCLIP's operands Q
//   and K run in the same pass: two score tiles, two online-softmax states, two accumulators, and
//   each V tile copied once for both.
// masked_affinity_forward (ProxyCLIP): a first O(n C) pass takes each feature row's inverse norm
//   and mean(S) = |mean_i f_i / |f_i||^2 per image, and packs the normalised features once per
//   image as the key operand of S (and the values, unless P V can read them in place). One task
//   per (batch, query tile) then walks over the key tiles: S from the normalised features,
//   S < beta mean(S) masked (never the diagonal), softmax(gamma S) online, applied to all heads at
//   once (one accumulator row of H*d per query), since the map is shared by every head.
//
// Every task writes its own rows of the output, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
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
// The affinity kernel's S over C = 768 features runs in slices of kChunk features, so the slice
// of the key panel stays in L1 across the row blocks.
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

// Images run in groups whose packed operands take about this many bytes, so the buffers stay
// in the last-level cache and the allocator reuses them between calls, whatever the batch.
constexpr int64_t kPackBytes = int64_t(16) << 20;
constexpr int64_t kPackBlock = 16;  // features per block of the panel transpose

// One group of images. Their normalised features are packed by the first pass as a [C, kBlockK]
// panel per key tile (transposed, zero-padded), the right operand of S = F F^T.
template <typename T>
struct AffinityProblem {
  AffinityShape s;  // s.B: images in the group
  Slice<T> f;       // image 0 of the group's f [n, C]; image b starts at f.p + b * fb
  int64_t fb;
  const T* panels;  // image b, key tile t: panels + b * panels_b + t * C * kBlockK
  int64_t panels_b;
  // The values as the P V product reads them: head h of image b is the [n, dv] matrix at
  // v + b * vb + h * vh with rows vn apart and unit column stride. That is v itself when its
  // columns are contiguous and d a multiple of every vector width, else a packed copy (dv = d
  // padded, rows of every head side by side).
  const T* v;
  int64_t vb, vh, vn, dv;
  Strided<T> out;   // image 0 of the group
  const T* rnorm;   // [B * n] 1 / max(|f_i|, eps)
  const T* thresh;  // [B] beta * mean(S)
  T gamma;
};

int64_t affinity_workspace(int64_t C, int64_t hdv) {
  return kBlockQ * C + kBlockQ * kBlockK + kBlockQ * hdv + 2 * kBlockQ;
}

// One (image, query tile) task: S tile by tile from the query rows and the key panels, the mask
// and the online softmax, then P V for every head at once (the map is shared by all heads).
struct AffinityTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const AffinityProblem<T>* P, int64_t b, int64_t q0, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const AffinityShape& s = P->s;
    const int64_t C = s.C, d = s.d, n = s.n, dv = P->dv, hdv = s.H * dv;
    const int64_t nq = min_of(kBlockQ, n - q0), rows = round_up(nq, R);
    T* fs = ws;                       // [BQ, C]   normalised query features
    T* sc = fs + kBlockQ * C;         // [BQ, BK]  S, then probabilities
    T* acc = sc + kBlockQ * kBlockK;  // [BQ, hdv] unnormalised output of every head
    T* mrow = acc + kBlockQ * hdv;    // [BQ]
    T* lrow = mrow + kBlockQ;         // [BQ]
    const T* rn = P->rnorm + b * n;
    const T* panels = P->panels + b * P->panels_b;
    const T* v = P->v + b * P->vb;
    const T thresh = P->thresh[b], gamma = P->gamma;
    copy_block(fs, C, Slice<T>{P->f.p + b * P->fb, P->f.sn, P->f.sd}, q0, nq, C, rn + q0);
    std::fill(fs + nq * C, fs + rows * C, T(0));
    std::fill(acc, acc + rows * hdv, T(0));
    std::fill(mrow, mrow + rows, kNegInf<T>);
    std::fill(lrow, lrow + rows, T(0));
    for (int64_t k0 = 0; k0 < n; k0 += kBlockK) {
      const int64_t nk = min_of(kBlockK, n - k0), cols = round_up(nk, W);
      const T* ft = panels + (k0 / kBlockK) * C * kBlockK;
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
        if (alpha != T(1)) {  // once a row's maximum has settled, most tiles leave it alone
          T* orow = acc + i * hdv;
#pragma omp simd
          for (int64_t c = 0; c < hdv; ++c) orow[c] *= alpha;
        }
      }
      // Rows nq..rows of sc are zero (zero-padded features) and add nothing.
      for (int64_t h = 0; h < s.H; ++h)
        gemm<T, Isa>(rows, dv, nk, sc, kBlockK, v + h * P->vh + k0 * P->vn, P->vn, acc + h * dv,
                     hdv, true);
    }
    const Strided<T>& o = P->out;
    for (int64_t h = 0; h < s.H; ++h) {
      T* ob = o.data + b * o.stride[0] + h * o.stride[1];
      for (int64_t i = 0; i < nq; ++i) {
        const T inv = T(1) / lrow[i];  // >= 1 term: the diagonal is never masked
        T* orow = ob + (q0 + i) * o.stride[2];
        for (int64_t e = 0; e < d; ++e) orow[e * o.stride[3]] = acc[i * hdv + h * dv + e] * inv;
      }
    }
  }
};

// Rows k0..k0+nk of one image's features f [n, C]: their inverse norms rn[0:nk], their panel
// [C, kBlockK] of normalised features (columns nk.. zero), and mean[c] = sum of the rows'
// normalised features (double). Loops run along f's smaller stride; in row-major f the panel is
// written kPackBlock features at a time, so the rows it writes stay in L1.
template <typename T>
void pack_feature_tile(Slice<T> f, int64_t k0, int64_t nk, int64_t C, T* rn, T* panel,
                       double* mean) {
  const bool rows_contiguous = f.sd <= f.sn;
  double sq[kBlockK] = {};
  auto square = [&](int64_t j, int64_t c) {
    const double x = f.at(k0 + j, c);
    sq[j] += x * x;
  };
  if (rows_contiguous) {
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t c = 0; c < C; ++c) square(j, c);
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < nk; ++j) square(j, c);
  }
  for (int64_t j = 0; j < nk; ++j) rn[j] = static_cast<T>(1.0 / std::max(std::sqrt(sq[j]), kNormEps));
  std::fill(mean, mean + C, 0.0);
  auto put = [&](int64_t j, int64_t c) {
    const double x = static_cast<double>(f.at(k0 + j, c)) * rn[j];
    panel[c * kBlockK + j] = static_cast<T>(x);
    mean[c] += x;
  };
  for (int64_t c0 = 0; c0 < C; c0 += kPackBlock) {
    const int64_t c1 = min_of(C, c0 + kPackBlock);
    if (rows_contiguous) {
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t c = c0; c < c1; ++c) put(j, c);
    } else {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t j = 0; j < nk; ++j) put(j, c);
    }
  }
  for (int64_t c = 0; c < C; ++c) std::fill(panel + c * kBlockK + nk, panel + (c + 1) * kBlockK, T(0));
}

// The O(n C) first pass of a group, one task per (image, key tile): pack_feature_tile, and the
// values' rows when P V does not read v in place (v: image 0 of the group). Then per image
// thresh = beta * mean(S), with mean(S) = |mean_i f_i rnorm_i|^2 (the mean of all n x n cosines),
// the tiles' sums added in a fixed order.
template <typename T>
void affinity_first_pass(const AffinityProblem<T>& P, double beta, Strided<const T> v, T* panels,
                         T* vpacked, T* rnorm, T* thresh, int threads) {
  const AffinityShape& s = P.s;
  const int64_t C = s.C, tiles = (s.n + kBlockK - 1) / kBlockK;
  std::vector<double> partial(static_cast<size_t>(s.B * tiles * C));
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (threads > 1)
  for (int64_t t = 0; t < s.B * tiles; ++t) {
    const int64_t b = t / tiles, k0 = (t % tiles) * kBlockK, nk = min_of(kBlockK, s.n - k0);
    pack_feature_tile(Slice<T>{P.f.p + b * P.fb, P.f.sn, P.f.sd}, k0, nk, C, rnorm + b * s.n + k0,
                      panels + b * P.panels_b + (k0 / kBlockK) * C * kBlockK,
                      partial.data() + t * C);
    if (vpacked == nullptr) continue;
    for (int64_t h = 0; h < s.H; ++h) {
      T* dst = vpacked + b * P.vb + h * P.vh + k0 * P.vn;
      copy_block(dst, P.vn, slice(v, b, h), k0, nk, s.d);
      for (int64_t j = 0; j < nk; ++j) std::fill(dst + j * P.vn + s.d, dst + j * P.vn + P.dv, T(0));
    }
  }
  std::vector<double> mean(static_cast<size_t>(C));
  for (int64_t b = 0; b < s.B; ++b) {
    std::fill(mean.begin(), mean.end(), 0.0);
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t c = 0; c < C; ++c) mean[c] += partial[(b * tiles + t) * C + c];
    double sq = 0;
    for (int64_t c = 0; c < C; ++c) sq += mean[c] * mean[c];
    thresh[b] = static_cast<T>(beta * sq / (static_cast<double>(s.n) * s.n));
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
  const int64_t tiles = (s.n + kBlockK - 1) / kBlockK;
  const bool v_in_place = v.stride[3] == 1 && s.d % kMaxLanes<T> == 0;
  AffinityProblem<T> P{};
  P.s = s;
  P.gamma = static_cast<T>(gamma);
  P.panels_b = tiles * s.C * kBlockK;
  P.dv = v_in_place ? s.d : round_up(s.d, kMaxLanes<T>);
  const int64_t v_image = v_in_place ? 0 : s.n * s.H * P.dv;  // packed values per image
  if (!v_in_place) P.vb = v_image, P.vh = P.dv, P.vn = s.H * P.dv;
  const double flops = 2.0 * static_cast<double>(s.B) * static_cast<double>(s.n) *
                       static_cast<double>(s.n) * static_cast<double>(s.C + s.H * s.d);
  const int nthreads = threads_for(threads, flops);
  // Images per group: within kPackBytes, but enough tasks to keep every thread busy
  const int64_t image_bytes = (P.panels_b + v_image) * static_cast<int64_t>(sizeof(T));
  const int64_t group = std::min(s.B, std::max({int64_t(1), kPackBytes / image_bytes,
                                                (8 * nthreads + tiles - 1) / tiles}));
  // Every element is written by the first pass before it is read: no zero-filling.
  std::unique_ptr<T[]> panels(new T[group * P.panels_b]), vpacked(new T[group * v_image]),
      rnorm(new T[group * s.n]), thresh(new T[group]);
  P.panels = panels.get(), P.rnorm = rnorm.get(), P.thresh = thresh.get();
  auto tile = isa_kernel<AffinityTile, const AffinityProblem<T>*, int64_t, int64_t, T*>();
  for (int64_t b0 = 0; b0 < s.B; b0 += group) {
    P.s.B = std::min(group, s.B - b0);
    P.f = {f.data + b0 * f.stride[0], f.stride[1], f.stride[2]};
    P.fb = f.stride[0];
    P.out = out;
    P.out.data += b0 * out.stride[0];
    Strided<const T> vg = v;
    vg.data += b0 * v.stride[0];
    if (v_in_place) P.v = vg.data, P.vb = v.stride[0], P.vh = v.stride[1], P.vn = v.stride[2];
    else P.v = vpacked.get();
    affinity_first_pass(P, beta, vg, panels.get(), v_in_place ? nullptr : vpacked.get(),
                        rnorm.get(), thresh.get(), nthreads);
    run_tiles(tile, P, P.s.B, s.n, kBlockQ, affinity_workspace(s.C, s.H * P.dv), nthreads);
  }
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
