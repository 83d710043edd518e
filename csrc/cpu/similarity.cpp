// SC-CLIP's ops on the CPU, forward only: flash-style tiles over the keys, no N x N buffer.
//
// Both ops start from the cosine similarities S = fn fn^T of an image's normalised features. A
// first pass, one task per (image, key tile), takes each row's inverse norm (as F.normalize),
// packs the normalised features as [C, kBlockK] key panels (transposed, zero-padded), and for the
// dual softmax also each head's k^T panels, the values where P V cannot read them in place, and
// the sums of the normalised features, from which mean(S) = |sum_i fn_i|^2 / N^2 needs no S.
// Then the query rows walk over the key tiles (one task per (image, query tile), or per image
// with each tile of the symmetric S computed once for two row blocks: see the drivers below),
// each tile of S serving every head:
//
// similarity_aggregation: W = S where S >= threshold, else 0; acc += W x_tile, rowsum += W; the
//   output is acc / (rowsum + 1e-6).
// averaged_dual_softmax: two online softmaxes per row, the masked affinity gamma S (S < beta
//   mean(S) masked, never the diagonal; one state per row, shared by every head) and, per head,
//   scale k k^T (one state per row and head); each value tile is copied once and feeds both
//   accumulators. The output is (acc_mask / l_mask + acc_k / l_k) / 2.
//
// S is computed in T (float32 or float64) and so is its threshold test. Every task writes its own
// rows of the output, so results do not depend on the thread count.
#include "similarity.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "isa.h"
#include "parallel.h"
#include "simd.h"
#include "tiles.h"

namespace armfast::cpu {
namespace {

constexpr int64_t kBlockQ = 64;  // query rows per tile (a multiple of every Isa::R)
constexpr int64_t kBlockK = 64;  // keys per tile (a multiple of every vector width)
constexpr int64_t kChunk = 64;   // S over C features in slices, so a panel slice stays in L1
constexpr double kNormEps = 1e-12;       // as torch.nn.functional.normalize
constexpr double kRowSumEps = 1e-6;      // added to W's row sums
constexpr int64_t kPackBytes = int64_t(16) << 20;  // packed operands of a group of images

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// One call of either op. The values are [B, H, N, d] (x as [B, 1, N, D]).
template <typename T>
struct Problem {
  SimilarityShape s;
  Strided<const T> f, k, v;  // k.data == nullptr: similarity aggregation
  Strided<T> out;
  bool v_in_place;  // P V reads v itself: unit column stride, d a multiple of every vector width
  int64_t dv;       // columns of one head's values as P V reads them (d, or d padded if packed)
  int64_t tiles;    // key tiles of an image
  // per image, in elements: [N] inverse norms, [tiles, C, BK] feature panels, [tiles, H, d, BK]
  // k^T panels (dual only), [N, H * dv] values (unless in place)
  int64_t o_panels, o_kpanels, o_values, image_elems;
  T threshold, scale, gamma;  // aggregation: threshold; dual: scale and gamma
  double beta;
  T* packed;  // tile path: the group's images, image_elems apart
  T* thresh;  // tile path, dual: beta * mean(S) per image of the group
};

// First pass over key tile t of image b: norms, feature panel and its column sums (sums[c],
// double), and for the dual softmax the k^T panels; the values when they are not read in place.
template <typename T>
void pack_tile(const Problem<T>& P, int64_t b, int64_t t, T* image, double* sums) {
  const SimilarityShape& s = P.s;
  const int64_t k0 = t * kBlockK, nk = min_of(kBlockK, s.N - k0), C = s.C;
  T* rn = image + k0;
  const Slice<T> f = slice(P.f, b, 0);
  double sq[kBlockK] = {};
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t c = 0; c < C; ++c) sq[j] += static_cast<double>(f.at(k0 + j, c)) * f.at(k0 + j, c);
  for (int64_t j = 0; j < nk; ++j) rn[j] = static_cast<T>(1.0 / std::max(std::sqrt(sq[j]), kNormEps));
  // the panel [C, BK]: fn^T of the tile, read along f's smaller stride
  T* panel = image + P.o_panels + t * C * kBlockK;
  copy_transposed(panel, kBlockK, f, k0, nk, kBlockK, C, T(1));
  for (int64_t c = 0; c < C; ++c) {
    T* row = panel + c * kBlockK;
    double sum = 0;
    for (int64_t j = 0; j < nk; ++j) {
      row[j] *= rn[j];
      sum += row[j];
    }
    sums[c] = sum;
  }
  for (int64_t h = 0; P.k.data != nullptr && h < s.H; ++h)
    copy_transposed(image + P.o_kpanels + (t * s.H + h) * s.d * kBlockK, kBlockK,
                    slice(P.k, b, h), k0, nk, kBlockK, s.d, T(1));
  if (P.v_in_place) return;
  const int64_t vn = s.H * P.dv;
  for (int64_t h = 0; h < s.H; ++h) {
    T* dst = image + P.o_values + k0 * vn + h * P.dv;
    copy_block(dst, vn, slice(P.v, b, h), k0, nk, s.d);
    for (int64_t j = 0; j < nk; ++j) std::fill(dst + j * vn + s.d, dst + j * vn + P.dv, T(0));
  }
}

// beta * mean(S) of one image from its tiles' sums of normalised features ([tiles, C]), added in
// a fixed order: mean(S) = |sum_i fn_i|^2 / N^2, with no S.
template <typename T>
T mask_threshold(const Problem<T>& P, const double* sums) {
  double sq = 0;
  for (int64_t c = 0; c < P.s.C; ++c) {
    double total = 0;
    for (int64_t t = 0; t < P.tiles; ++t) total += sums[t * P.s.C + c];
    sq += total * total;
  }
  return static_cast<T>(P.beta * sq / (static_cast<double>(P.s.N) * static_cast<double>(P.s.N)));
}

// The tile path's first pass over a group of images, then each image's mask threshold. It moves
// O(N (C + H d)) elements per image: a small call runs it on one thread rather than wake another.
template <typename T>
void first_pass(const Problem<T>& P, int max_threads) {
  const int64_t C = P.s.C, tiles = P.tiles, B = P.s.B;
  const int threads = threads_for(
      max_threads, 4.0 * static_cast<double>(B * P.s.N) * static_cast<double>(C + P.s.H * P.s.d));
  std::vector<double> sums(static_cast<size_t>(B * tiles * C));
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (threads > 1)
  for (int64_t bt = 0; bt < B * tiles; ++bt)
    pack_tile(P, bt / tiles, bt % tiles, P.packed + (bt / tiles) * P.image_elems, sums.data() + bt * C);
  for (int64_t b = 0; P.k.data != nullptr && b < B; ++b)
    P.thresh[b] = mask_threshold(P, sums.data() + b * tiles * C);
}

// The image path's first pass, inside the image's task: its operands in `image` (hot in this
// thread's cache for the products), and its mask threshold.
template <typename T>
T pack_image(const Problem<T>& P, int64_t b, T* image) {
  std::vector<double> sums(static_cast<size_t>(P.tiles * P.s.C));
  for (int64_t t = 0; t < P.tiles; ++t) pack_tile(P, b, t, image, sums.data() + t * P.s.C);
  return P.k.data != nullptr ? mask_threshold(P, sums.data()) : T(0);
}

// One image's packed operands and values, as the tile tasks read them.
template <typename T>
struct Image {
  const T *rnorm, *panels, *kpanels;
  const T* v;  // head h: the [N, dv] matrix at v + h * vh, rows vn apart
  int64_t vh, vn;
};

template <typename T>
Image<T> image_of(const Problem<T>& P, int64_t b, const T* image) {
  Image<T> im{image, image + P.o_panels, image + P.o_kpanels, nullptr, 0, 0};
  if (P.v_in_place) {
    im.v = P.v.data + b * P.v.stride[0], im.vh = P.v.stride[1], im.vn = P.v.stride[2];
  } else {  // [N, H * dv]: a row holds every head, as the accumulators
    im.v = image + P.o_values, im.vh = P.dv, im.vn = P.s.H * P.dv;
  }
  return im;
}

// fs [rows, C]: the normalised features of rows q0..q0+nq, rows nq.. zero.
template <typename T>
ARMFAST_INLINE void query_features(const Problem<T>* P, const Image<T>& im, int64_t b, int64_t q0,
                                   int64_t nq, int64_t rows, T* fs) {
  copy_block(fs, P->s.C, slice(P->f, b, 0), q0, nq, P->s.C, im.rnorm + q0);
  std::fill(fs + nq * P->s.C, fs + rows * P->s.C, T(0));
}

// sc[0:rows, 0:cols] = S of the query features fs [rows, C] against key tile t's panel.
template <class Isa, typename T>
ARMFAST_INLINE void cosine_tile(const T* fs, int64_t rows, int64_t C, const T* panel, int64_t cols,
                                T* sc) {
  for (int64_t c0 = 0; c0 < C; c0 += kChunk)
    gemm<T, Isa>(rows, cols, min_of(kChunk, C - c0), fs + c0, C, panel + c0 * kBlockK, kBlockK, sc,
                 kBlockK, c0 > 0);
}

// dst [cols, pitch kBlockQ] = src[0:rows, 0:cols]^T (src pitch kBlockK), then rows cols..pad of
// dst zero: the tile of S (or of k k^T) for the key block's rows, from the query block's.
template <typename T>
ARMFAST_INLINE void transpose_tile(const T* src, int64_t rows, int64_t cols, int64_t pad, T* dst) {
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) dst[j * kBlockQ + i] = src[i * kBlockK + j];
  std::fill(dst + cols * kBlockQ, dst + pad * kBlockQ, T(0));
}

// Two drivers per op, with the same arithmetic in the same order for every row, so both give the
// same bits. Tile path: one task per (image, query tile), over every key tile. Image path: one
// task per image, each tile (I, J >= I) of the symmetric S (and of each head's k k^T) computed
// once, for rows I (keys J) and, transposed, rows J (keys I); every row still takes its key tiles
// in increasing order. The image path does less work but cannot split an image between threads.

// ---- similarity aggregation -----------------------------------------------------------------

template <typename T>
struct AggregationRows {  // the running W x [rows, dv] and rowsum(W) [rows] of a block of rows
  T *acc, *rowsum;
  int64_t dv;
  AggregationRows from(int64_t r) const { return {acc + r * dv, rowsum + r, dv}; }
};

// Rows 0..nr of the tile w (S of keys k0..k0+nk, pitch kBlockK; rows nr.. zero) become W = S [S
// >= threshold]; their row sums are added key by key (in order, not reassociated) and W x_tile
// is added to their accumulators.
template <class Isa, typename T>
ARMFAST_INLINE void aggregate(const Problem<T>* P, const Image<T>& im, T* w, int64_t nr, int64_t k0,
                              int64_t nk, AggregationRows<T> rows) {
  const T threshold = P->threshold;
  for (int64_t i = 0; i < nr; ++i) {
    T* row = w + i * kBlockK;
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) row[j] = row[j] >= threshold ? row[j] : T(0);
    T sum = rows.rowsum[i];
    for (int64_t j = 0; j < nk; ++j) sum += row[j];
    rows.rowsum[i] = sum;
  }
  gemm<T, Isa>(round_up(nr, Isa::R), rows.dv, nk, w, kBlockK, im.v + k0 * im.vn, im.vn, rows.acc,
               rows.dv, true);
}

// out[b, r0:r0+nr] = acc / (rowsum + 1e-6)
template <typename T>
void aggregation_write(const Problem<T>* P, int64_t b, int64_t r0, int64_t nr, AggregationRows<T> rows) {
  const Strided<T>& o = P->out;
  for (int64_t i = 0; i < nr; ++i) {
    T* orow = o.data + b * o.stride[0] + (r0 + i) * o.stride[2];
    const T inv = T(1) / (rows.rowsum[i] + static_cast<T>(kRowSumEps));
    for (int64_t c = 0; c < P->s.d; ++c) orow[c * o.stride[3]] = rows.acc[i * rows.dv + c] * inv;
  }
}

template <typename T>
int64_t aggregation_workspace(const Problem<T>& P, bool image) {  // the image path packs its own
  const int64_t rows = image ? P.tiles * kBlockQ : kBlockQ;
  return (image ? P.image_elems : 0) + kBlockQ * P.s.C + 2 * kBlockQ * kBlockK + rows * (P.dv + 1);
}

struct AggregationTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t b, int64_t q0, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const int64_t C = P->s.C, N = P->s.N, dv = P->dv;
    const int64_t nq = min_of(kBlockQ, N - q0), rows = round_up(nq, R);
    T* fs = ws;                                  // [BQ, C]   normalised query features
    T* sc = fs + kBlockQ * C;                    // [BQ, BK]  S, then W
    const AggregationRows<T> state{sc + 2 * kBlockQ * kBlockK, sc + 2 * kBlockQ * kBlockK + kBlockQ * dv, dv};
    const Image<T> im = image_of(*P, b, P->packed + b * P->image_elems);
    query_features(P, im, b, q0, nq, rows, fs);
    std::fill(state.acc, state.acc + kBlockQ * (dv + 1), T(0));  // acc and rowsum
    for (int64_t t = 0; t < P->tiles; ++t) {
      const int64_t k0 = t * kBlockK, nk = min_of(kBlockK, N - k0);
      cosine_tile<Isa>(fs, rows, C, im.panels + t * C * kBlockK, round_up(nk, W), sc);
      aggregate<Isa>(P, im, sc, nq, k0, nk, state);
    }
    aggregation_write(P, b, q0, nq, state);
  }
};

struct AggregationImage {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t b, int64_t, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const int64_t C = P->s.C, N = P->s.N, dv = P->dv, nrows = P->tiles * kBlockQ;
    T* image = ws;                       // this image's packed operands
    T* fs = image + P->image_elems;      // [BQ, C]        normalised features of rows I
    T* sc = fs + kBlockQ * C;            // [BQ, BK]       S_IJ, then W_IJ
    T* st = sc + kBlockQ * kBlockK;      // [BK, BQ]       S_JI, then W_JI
    const AggregationRows<T> state{st + kBlockK * kBlockQ, st + kBlockK * kBlockQ + nrows * dv, dv};
    std::fill(state.acc, state.acc + nrows * (dv + 1), T(0));  // acc and rowsum of every row
    pack_image(*P, b, image);
    const Image<T> im = image_of(*P, b, image);
    for (int64_t I = 0; I < P->tiles; ++I) {
      const int64_t i0 = I * kBlockQ, ni = min_of(kBlockQ, N - i0);
      query_features(P, im, b, i0, ni, round_up(ni, R), fs);
      for (int64_t J = I; J < P->tiles; ++J) {
        const int64_t j0 = J * kBlockK, nj = min_of(kBlockK, N - j0);
        cosine_tile<Isa>(fs, round_up(ni, R), C, im.panels + J * C * kBlockK, round_up(nj, W), sc);
        if (J > I) transpose_tile(sc, ni, nj, round_up(nj, R), st);
        aggregate<Isa>(P, im, sc, ni, j0, nj, state.from(i0));
        if (J > I) aggregate<Isa>(P, im, st, nj, i0, ni, state.from(j0));
      }
    }
    aggregation_write(P, b, 0, N, state);
  }
};

// ---- averaged dual softmax: every head in one task ---------------------------------------------

// acc[0:n] *= alpha for a row whose running maximum moved.
template <typename T>
ARMFAST_INLINE void rescale(T* acc, int64_t n, T alpha) {
  if (alpha == T(1)) return;  // once a row's maximum has settled, most tiles leave it alone
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) acc[c] *= alpha;
}

template <typename T>
struct DualRows {  // the online-softmax states of a block of rows (heads `pitch` rows apart)
  T *acc_m, *acc_k;  // [rows, H * dv]  P_mask V and P_k V, unnormalised, every head
  T *m_m, *l_m;      // [rows]          the mask's running max and sum
  T *m_k, *l_k;      // [H, pitch]      each head's running max and sum
  int64_t hdv, pitch;
  DualRows from(int64_t r) const {
    return {acc_m + r * hdv, acc_k + r * hdv, m_m + r, l_m + r, m_k + r, l_k + r, hdv, pitch};
  }
  static int64_t elems(int64_t rows, int64_t H, int64_t hdv) { return rows * (2 * hdv + 2 + 2 * H); }
  static DualRows carve(T* w, int64_t rows, int64_t H, int64_t hdv) {
    T* acc = w + 2 * rows * (H + 1);  // states first, then the accumulators
    return {acc, acc + rows * hdv, w, w + rows, w + 2 * rows, w + (2 + H) * rows, hdv, rows};
  }
  void init(int64_t H) const {
    std::fill(m_m, m_m + pitch, kNegInf<T>);
    std::fill(m_k, m_k + H * pitch, kNegInf<T>);
    std::fill(l_m, l_m + pitch, T(0));
    std::fill(l_k, l_k + H * pitch, T(0));
    std::fill(acc_m, acc_m + 2 * pitch * hdv, T(0));  // acc_m and acc_k
  }
};

// The mask's online softmax over rows 0..nr of the S tile sm (rows r0.., keys k0..k0+nk).
template <typename T>
ARMFAST_INLINE void mask_rows(const Problem<T>* P, T* sm, int64_t nr, int64_t r0, int64_t k0,
                              int64_t nk, int64_t cols, DualRows<T> rows, T thresh) {
  for (int64_t i = 0; i < nr; ++i) {
    T* srow = sm + i * kBlockK;
    mask_affinity_row(srow, nk, thresh, P->gamma, r0 + i - k0);
    rescale(rows.acc_m + i * rows.hdv, rows.hdv, online_softmax_row(srow, nk, cols, rows.m_m[i], rows.l_m[i]));
  }
}

// Head h: the online softmax of scale * sk (k k^T of the rows and keys k0..k0+nk), then one value
// tile into both accumulators (the mask's probabilities sm and the head's sk; rows nr.. are 0).
template <class Isa, typename T>
ARMFAST_INLINE void head_rows(const Problem<T>* P, const Image<T>& im, int64_t h, const T* sm,
                              T* sk, int64_t nr, int64_t k0, int64_t nk, int64_t cols, DualRows<T> rows) {
  const int64_t dv = P->dv;
  for (int64_t i = 0; i < nr; ++i) {
    T* srow = sk + i * kBlockK;
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) srow[j] *= P->scale;  // after the product: k k^T symmetric
    rescale(rows.acc_k + i * rows.hdv + h * dv, dv,
            online_softmax_row(srow, nk, cols, rows.m_k[h * rows.pitch + i], rows.l_k[h * rows.pitch + i]));
  }
  const T* vt = im.v + h * im.vh + k0 * im.vn;
  const int64_t m = round_up(nr, Isa::R);
  gemm<T, Isa>(m, dv, nk, sm, kBlockK, vt, im.vn, rows.acc_m + h * dv, rows.hdv, true);
  gemm<T, Isa>(m, dv, nk, sk, kBlockK, vt, im.vn, rows.acc_k + h * dv, rows.hdv, true);
}

// kq [H, BQ, d]: each head's k of rows r0..r0+nr, rows nr..rows zero.
template <typename T>
ARMFAST_INLINE void query_keys(const Problem<T>* P, int64_t b, int64_t r0, int64_t nr, int64_t rows, T* kq) {
  for (int64_t h = 0; h < P->s.H; ++h)
    copy_rows(kq + h * kBlockQ * P->s.d, P->s.d, slice(P->k, b, h), r0, nr, rows, P->s.d, T(1));
}

// out[b, :, r0:r0+nr] = (acc_m / l_m + acc_k / l_k) / 2, head by head.
template <typename T>
void dual_write(const Problem<T>* P, int64_t b, int64_t r0, int64_t nr, DualRows<T> rows) {
  const Strided<T>& o = P->out;
  const int64_t dv = P->dv;
  for (int64_t h = 0; h < P->s.H; ++h) {
    for (int64_t i = 0; i < nr; ++i) {
      T* orow = o.data + b * o.stride[0] + h * o.stride[1] + (r0 + i) * o.stride[2];
      // l_m >= 1 term (the diagonal is never masked), l_k >= 1 (its maximum)
      const T a = T(0.5) / rows.l_m[i], c = T(0.5) / rows.l_k[h * rows.pitch + i];
      const T* am = rows.acc_m + i * rows.hdv + h * dv;
      const T* ak = rows.acc_k + i * rows.hdv + h * dv;
      for (int64_t e = 0; e < P->s.d; ++e) orow[e * o.stride[3]] = am[e] * a + ak[e] * c;
    }
  }
}

template <typename T>
int64_t dual_workspace(const Problem<T>& P, bool image) {
  const int64_t H = P.s.H, rows = image ? P.tiles * kBlockQ : kBlockQ;
  return (image ? P.image_elems : 0) + kBlockQ * P.s.C + 4 * kBlockQ * kBlockK + H * kBlockQ * P.s.d +
         DualRows<T>::elems(rows, H, H * P.dv);
}

struct DualTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t b, int64_t q0, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const int64_t C = P->s.C, N = P->s.N, H = P->s.H, d = P->s.d;
    const int64_t nq = min_of(kBlockQ, N - q0), rows = round_up(nq, R);
    T* fs = ws;                          // [BQ, C]      normalised query features
    T* sm = fs + kBlockQ * C;            // [BQ, BK]     S, then the mask's probabilities
    T* sk = sm + kBlockQ * kBlockK;      // [BQ, BK]     k k^T of one head, then its p
    T* kq = sk + kBlockQ * kBlockK;      // [H, BQ, d]   each head's k of the query rows
    const DualRows<T> state = DualRows<T>::carve(kq + H * kBlockQ * d, kBlockQ, H, H * P->dv);
    const Image<T> im = image_of(*P, b, P->packed + b * P->image_elems);
    query_features(P, im, b, q0, nq, rows, fs);
    query_keys(P, b, q0, nq, rows, kq);
    state.init(H);
    for (int64_t t = 0; t < P->tiles; ++t) {
      const int64_t k0 = t * kBlockK, nk = min_of(kBlockK, N - k0), cols = round_up(nk, W);
      cosine_tile<Isa>(fs, rows, C, im.panels + t * C * kBlockK, cols, sm);
      mask_rows(P, sm, nq, q0, k0, nk, cols, state, P->thresh[b]);
      for (int64_t h = 0; h < H; ++h) {
        gemm<T, Isa>(rows, cols, d, kq + h * kBlockQ * d, d, im.kpanels + (t * H + h) * d * kBlockK,
                     kBlockK, sk, kBlockK, false);
        head_rows<Isa>(P, im, h, sm, sk, nq, k0, nk, cols, state);
      }
    }
    dual_write(P, b, q0, nq, state);
  }
};

struct DualImage {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t b, int64_t, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const int64_t C = P->s.C, N = P->s.N, H = P->s.H, d = P->s.d, nrows = P->tiles * kBlockQ;
    T* image = ws;                       // this image's packed operands
    T* fs = image + P->image_elems;      // [BQ, C]      normalised features of rows I
    T* sm = fs + kBlockQ * C;            // [BQ, BK]     S_IJ, then the mask's p of rows I
    T* sk = sm + kBlockQ * kBlockK;      // [BQ, BK]     k_I k_J^T of one head, then its p
    T* smt = sk + kBlockQ * kBlockK;     // [BK, BQ]     S_JI, then the mask's p of rows J
    T* skt = smt + kBlockK * kBlockQ;    // [BK, BQ]     k_J k_I^T, then its p
    T* kq = skt + kBlockK * kBlockQ;     // [H, BQ, d]   each head's k of rows I
    const DualRows<T> state = DualRows<T>::carve(kq + H * kBlockQ * d, nrows, H, H * P->dv);
    const T thresh = pack_image(*P, b, image);
    const Image<T> im = image_of(*P, b, image);
    state.init(H);
    for (int64_t I = 0; I < P->tiles; ++I) {
      const int64_t i0 = I * kBlockQ, ni = min_of(kBlockQ, N - i0), ri = round_up(ni, R);
      query_features(P, im, b, i0, ni, ri, fs);
      query_keys(P, b, i0, ni, ri, kq);
      for (int64_t J = I; J < P->tiles; ++J) {
        const int64_t j0 = J * kBlockK, nj = min_of(kBlockK, N - j0), rj = round_up(nj, R);
        const int64_t cols_j = round_up(nj, W), cols_i = round_up(ni, W);
        cosine_tile<Isa>(fs, ri, C, im.panels + J * C * kBlockK, cols_j, sm);
        if (J > I) transpose_tile(sm, ni, nj, rj, smt);
        mask_rows(P, sm, ni, i0, j0, nj, cols_j, state.from(i0), thresh);
        if (J > I) mask_rows(P, smt, nj, j0, i0, ni, cols_i, state.from(j0), thresh);
        for (int64_t h = 0; h < H; ++h) {
          gemm<T, Isa>(ri, cols_j, d, kq + h * kBlockQ * d, d, im.kpanels + (J * H + h) * d * kBlockK,
                       kBlockK, sk, kBlockK, false);
          if (J > I) transpose_tile(sk, ni, nj, rj, skt);
          head_rows<Isa>(P, im, h, sm, sk, ni, j0, nj, cols_j, state.from(i0));
          if (J > I) head_rows<Isa>(P, im, h, smt, skt, nj, i0, ni, cols_i, state.from(j0));
        }
      }
    }
    dual_write(P, b, 0, N, state);
  }
};

// Lays out the packed operands, then runs the image path when the images round up to the threads
// with less than ~15% of a round idle (each task packs its own image), else the tile path: images
// in groups, each group's first pass then its (image, query tile) tasks.
template <typename T, class Tile, class ImageTask>
void run(Problem<T>& P, double flops, int threads) {
  const SimilarityShape& s = P.s;
  const bool dual = P.k.data != nullptr;
  P.v_in_place = P.v.stride[3] == 1 && s.d % kMaxLanes<T> == 0;
  P.dv = P.v_in_place ? s.d : round_up(s.d, kMaxLanes<T>);
  P.tiles = (s.N + kBlockK - 1) / kBlockK;
  P.o_panels = round_up(s.N, kMaxLanes<T>);
  P.o_kpanels = P.o_panels + P.tiles * s.C * kBlockK;
  P.o_values = P.o_kpanels + (dual ? P.tiles * s.H * s.d * kBlockK : 0);
  P.image_elems = round_up(P.o_values + (P.v_in_place ? 0 : s.N * s.H * P.dv), kMaxLanes<T>);
  const int nthreads = threads_for(threads, flops);
  const int64_t rounds = (s.B + nthreads - 1) / nthreads;
  if (20 * rounds * nthreads <= 23 * s.B) {
    const int64_t ws = dual ? dual_workspace(P, true) : aggregation_workspace(P, true);
    run_tiles(isa_kernel<ImageTask, const Problem<T>*, int64_t, int64_t, T*>(), P, s.B, 1, 1, ws,
              nthreads);
    return;
  }
  // groups within kPackBytes of packed operands, but with enough tasks for the threads
  const int64_t image_bytes = P.image_elems * static_cast<int64_t>(sizeof(T));
  const int64_t group = std::min(s.B, std::max({int64_t(1), kPackBytes / image_bytes,
                                                (8 * nthreads + P.tiles - 1) / P.tiles}));
  std::unique_ptr<T[]> packed(new T[group * P.image_elems]), thresh(new T[group]);
  P.packed = packed.get(), P.thresh = thresh.get();
  auto tile = isa_kernel<Tile, const Problem<T>*, int64_t, int64_t, T*>();
  const int64_t ws = dual ? dual_workspace(P, false) : aggregation_workspace(P, false);
  for (int64_t b0 = 0; b0 < s.B; b0 += group) {
    Problem<T> G = P;
    G.s.B = std::min(group, s.B - b0);
    G.f.data += b0 * P.f.stride[0];
    if (dual) G.k.data += b0 * P.k.stride[0];
    G.v.data += b0 * P.v.stride[0];
    G.out.data += b0 * P.out.stride[0];
    first_pass(G, nthreads);
    run_tiles(tile, G, G.s.B, s.N, kBlockQ, ws, nthreads);
  }
}

}  // namespace

template <typename T>
void similarity_aggregation_forward(const SimilarityShape& s, Strided<const T> f,
                                    Strided<const T> x, Strided<T> out, double threshold,
                                    int threads) {
  Problem<T> P{};
  P.s = s;
  // f [B, N, C] and x, out [B, N, D] as 4-D views with one "head" (f: [B, 1, N, C])
  P.f = {f.data, {f.stride[0], 0, f.stride[1], f.stride[2]}};
  P.k = {nullptr, {0, 0, 0, 0}};
  P.v = {x.data, {x.stride[0], 0, x.stride[1], x.stride[2]}};
  P.out = {out.data, {out.stride[0], 0, out.stride[1], out.stride[2]}};
  P.threshold = static_cast<T>(threshold);
  const double n2 = static_cast<double>(s.N) * static_cast<double>(s.N);
  run<T, AggregationTile, AggregationImage>(P, 2.0 * s.B * n2 * static_cast<double>(s.C + s.d), threads);
}

template <typename T>
void averaged_dual_softmax_forward(const SimilarityShape& s, Strided<const T> f,
                                   Strided<const T> k, Strided<const T> v, Strided<T> out,
                                   double scale, double beta, double gamma, int threads) {
  Problem<T> P{};
  P.s = s;
  P.f = {f.data, {f.stride[0], 0, f.stride[1], f.stride[2]}};
  P.k = k, P.v = v, P.out = out;
  P.scale = static_cast<T>(scale), P.gamma = static_cast<T>(gamma), P.beta = beta;
  const double n2 = static_cast<double>(s.N) * static_cast<double>(s.N);
  run<T, DualTile, DualImage>(P, 2.0 * s.B * n2 * static_cast<double>(s.C + 3 * s.H * s.d), threads);
}

#define ARMFAST_INSTANTIATE(T)                                                                     \
  template void similarity_aggregation_forward<T>(const SimilarityShape&, Strided<const T>,       \
                                                  Strided<const T>, Strided<T>, double, int);     \
  template void averaged_dual_softmax_forward<T>(const SimilarityShape&, Strided<const T>,        \
                                                 Strided<const T>, Strided<const T>, Strided<T>,  \
                                                 double, double, double, int);
ARMFAST_INSTANTIATE(float)
ARMFAST_INSTANTIATE(double)
#undef ARMFAST_INSTANTIATE

}  // namespace armfast::cpu
