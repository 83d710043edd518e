// SC-CLIP's ops on the CPU, forward only: flash-style tiles over the keys, no N x N buffer.
//
// Both ops start from the cosine similarities S = fn fn^T of an image's normalised features. A
// first pass, one task per (image, key tile), takes each row's inverse norm (as F.normalize),
// packs the normalised features as [C, kBlockK] key panels (transposed, zero-padded), and for the
// dual softmax also each head's k^T panels, the values where P V cannot read them in place, and
// the sums of the normalised features, from which mean(S) = |sum_i fn_i|^2 / N^2 needs no S.
// Then one task per (image, query tile) walks over the key tiles, computing each tile of S once
// for every head:
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
  T* packed;  // the group's images, image_elems apart
  T* thresh;  // dual: beta * mean(S) per image of the group
};

// First pass over key tile t of image b: norms, feature panel and its column sums (sums[c],
// double), and for the dual softmax the k^T panels; the values when they are not read in place.
template <typename T>
void pack_tile(const Problem<T>& P, int64_t b, int64_t t, double* sums) {
  const SimilarityShape& s = P.s;
  const int64_t k0 = t * kBlockK, nk = min_of(kBlockK, s.N - k0), C = s.C;
  T* image = P.packed + b * P.image_elems;
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

// The first pass over a group of images, then each image's beta * mean(S) (dual softmax) from
// its tiles' sums, added in a fixed order.
template <typename T>
void first_pass(const Problem<T>& P, int threads) {
  const int64_t C = P.s.C, tiles = P.tiles, B = P.s.B;
  std::vector<double> sums(static_cast<size_t>(B * tiles * C));
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (threads > 1)
  for (int64_t bt = 0; bt < B * tiles; ++bt) pack_tile(P, bt / tiles, bt % tiles, sums.data() + bt * C);
  if (P.k.data == nullptr) return;
  const double n2 = static_cast<double>(P.s.N) * static_cast<double>(P.s.N);
  for (int64_t b = 0; b < B; ++b) {
    double sq = 0;
    for (int64_t c = 0; c < C; ++c) {
      double total = 0;
      for (int64_t t = 0; t < tiles; ++t) total += sums[(b * tiles + t) * C + c];
      sq += total * total;
    }
    P.thresh[b] = static_cast<T>(P.beta * sq / n2);
  }
}

// One image's packed operands and values, as the tile tasks read them.
template <typename T>
struct Image {
  const T *rnorm, *panels, *kpanels;
  const T* v;  // head h: the [N, dv] matrix at v + h * vh, rows vn apart
  int64_t vh, vn;
};

template <typename T>
Image<T> image_of(const Problem<T>& P, int64_t b) {
  const T* image = P.packed + b * P.image_elems;
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

// ---- similarity aggregation: one (image, query tile) task --------------------------------------

template <typename T>
int64_t aggregation_workspace(const Problem<T>& P) {
  return kBlockQ * P.s.C + kBlockQ * kBlockK + kBlockQ * P.dv + kBlockQ;
}

struct AggregationTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t b, int64_t q0, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const int64_t C = P->s.C, N = P->s.N, dv = P->dv;
    const int64_t nq = min_of(kBlockQ, N - q0), rows = round_up(nq, R);
    T* fs = ws;                        // [BQ, C]   normalised query features
    T* sc = fs + kBlockQ * C;          // [BQ, BK]  S, then W
    T* acc = sc + kBlockQ * kBlockK;   // [BQ, dv]  W x
    T* rowsum = acc + kBlockQ * dv;    // [BQ]      rowsum(W)
    const Image<T> im = image_of(*P, b);
    query_features(P, im, b, q0, nq, rows, fs);
    std::fill(acc, acc + rows * dv, T(0));
    std::fill(rowsum, rowsum + rows, T(0));
    const T threshold = P->threshold;
    for (int64_t t = 0; t < P->tiles; ++t) {
      const int64_t k0 = t * kBlockK, nk = min_of(kBlockK, N - k0);
      cosine_tile<Isa>(fs, rows, C, im.panels + t * C * kBlockK, round_up(nk, W), sc);
      for (int64_t i = 0; i < nq; ++i) {
        T* srow = sc + i * kBlockK;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < nk; ++j) {
          const T w = srow[j] >= threshold ? srow[j] : T(0);
          srow[j] = w;
          sum += w;
        }
        rowsum[i] += sum;
      }
      // rows nq..rows of sc are 0 (zero query features): they add nothing
      gemm<T, Isa>(rows, dv, nk, sc, kBlockK, im.v + k0 * im.vn, im.vn, acc, dv, true);
    }
    const Strided<T>& o = P->out;
    for (int64_t i = 0; i < nq; ++i) {
      T* orow = o.data + b * o.stride[0] + (q0 + i) * o.stride[2];
      const T inv = T(1) / (rowsum[i] + static_cast<T>(kRowSumEps));
      for (int64_t c = 0; c < P->s.d; ++c) orow[c * o.stride[3]] = acc[i * dv + c] * inv;
    }
  }
};

// ---- averaged dual softmax: one (image, query tile) task, every head ---------------------------

template <typename T>
int64_t dual_workspace(const Problem<T>& P) {
  const int64_t H = P.s.H, hdv = H * P.dv;
  return kBlockQ * P.s.C + 2 * kBlockQ * kBlockK + H * kBlockQ * P.s.d + 2 * kBlockQ * hdv +
         2 * kBlockQ + 2 * H * kBlockQ;
}

// acc[i, 0:n] *= alpha for a row whose running maximum moved.
template <typename T>
ARMFAST_INLINE void rescale(T* acc, int64_t n, T alpha) {
  if (alpha == T(1)) return;  // once a row's maximum has settled, most tiles leave it alone
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) acc[c] *= alpha;
}

struct DualTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t b, int64_t q0, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const SimilarityShape& s = P->s;
    const int64_t C = s.C, N = s.N, H = s.H, d = s.d, dv = P->dv, hdv = H * dv;
    const int64_t nq = min_of(kBlockQ, N - q0), rows = round_up(nq, R);
    T* fs = ws;                          // [BQ, C]      normalised query features
    T* sm = fs + kBlockQ * C;            // [BQ, BK]     S, then the mask's probabilities
    T* sk = sm + kBlockQ * kBlockK;      // [BQ, BK]     scale k k^T of one head, then its p
    T* kq = sk + kBlockQ * kBlockK;      // [H, BQ, d]   scale * k of the query rows
    T* acc_m = kq + H * kBlockQ * d;     // [BQ, H*dv]   P_mask V, unnormalised, every head
    T* acc_k = acc_m + kBlockQ * hdv;    // [BQ, H*dv]   P_k V, unnormalised, head by head
    T* m_m = acc_k + kBlockQ * hdv;      // [BQ]         the mask's running max and sum
    T* l_m = m_m + kBlockQ;
    T* m_k = l_m + kBlockQ;              // [H, BQ]      each head's running max and sum
    T* l_k = m_k + H * kBlockQ;
    const Image<T> im = image_of(*P, b);
    query_features(P, im, b, q0, nq, rows, fs);
    for (int64_t h = 0; h < H; ++h)
      copy_rows(kq + h * kBlockQ * d, d, slice(P->k, b, h), q0, nq, rows, d, P->scale);
    std::fill(acc_m, acc_m + 2 * kBlockQ * hdv, T(0));  // acc_m and acc_k
    std::fill(m_m, m_m + kBlockQ, kNegInf<T>);
    std::fill(l_m, l_m + kBlockQ, T(0));
    std::fill(m_k, m_k + H * kBlockQ, kNegInf<T>);
    std::fill(l_k, l_k + H * kBlockQ, T(0));
    const T thresh = P->thresh[b], gamma = P->gamma;
    for (int64_t t = 0; t < P->tiles; ++t) {
      const int64_t k0 = t * kBlockK, nk = min_of(kBlockK, N - k0), cols = round_up(nk, W);
      cosine_tile<Isa>(fs, rows, C, im.panels + t * C * kBlockK, cols, sm);
      for (int64_t i = 0; i < nq; ++i) {
        T* srow = sm + i * kBlockK;
        const int64_t diagonal = q0 + i - k0;  // the key index of S_ii in this tile, if any
#pragma omp simd
        for (int64_t j = 0; j < nk; ++j)
          srow[j] = srow[j] >= thresh || j == diagonal ? gamma * srow[j] : kNegInf<T>;
        rescale(acc_m + i * hdv, hdv, online_softmax_row(srow, nk, cols, m_m[i], l_m[i]));
      }
      for (int64_t h = 0; h < H; ++h) {
        gemm<T, Isa>(rows, cols, d, kq + h * kBlockQ * d, d,
                     im.kpanels + (t * H + h) * d * kBlockK, kBlockK, sk, kBlockK, false);
        for (int64_t i = 0; i < nq; ++i)
          rescale(acc_k + i * hdv + h * dv, dv,
                  online_softmax_row(sk + i * kBlockK, nk, cols, m_k[h * kBlockQ + i],
                                     l_k[h * kBlockQ + i]));
        // one value tile, both maps; rows nq..rows of sm and sk are 0 and add nothing
        const T* vt = im.v + h * im.vh + k0 * im.vn;
        gemm<T, Isa>(rows, dv, nk, sm, kBlockK, vt, im.vn, acc_m + h * dv, hdv, true);
        gemm<T, Isa>(rows, dv, nk, sk, kBlockK, vt, im.vn, acc_k + h * dv, hdv, true);
      }
    }
    const Strided<T>& o = P->out;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < nq; ++i) {
        T* orow = o.data + b * o.stride[0] + h * o.stride[1] + (q0 + i) * o.stride[2];
        // halves of 1 / l: l_m >= 1 term (the diagonal is never masked), l_k >= 1 (its maximum)
        const T a = T(0.5) / l_m[i], c = T(0.5) / l_k[h * kBlockQ + i];
        const T* am = acc_m + i * hdv + h * dv;
        const T* ak = acc_k + i * hdv + h * dv;
        for (int64_t e = 0; e < d; ++e) orow[e * o.stride[3]] = am[e] * a + ak[e] * c;
      }
    }
  }
};

// Lays out the packed operands, then runs the first pass and the tile tasks group by group.
template <typename T, class Tile>
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
  const int64_t workspace = dual ? dual_workspace(P) : aggregation_workspace(P);
  const int nthreads = threads_for(threads, flops);
  // images in groups within kPackBytes of packed operands, but with enough tasks for the threads
  const int64_t image_bytes = P.image_elems * static_cast<int64_t>(sizeof(T));
  const int64_t group = std::min(s.B, std::max({int64_t(1), kPackBytes / image_bytes,
                                                (8 * nthreads + P.tiles - 1) / P.tiles}));
  std::unique_ptr<T[]> packed(new T[group * P.image_elems]), thresh(new T[group]);
  P.packed = packed.get(), P.thresh = thresh.get();
  auto task = isa_kernel<Tile, const Problem<T>*, int64_t, int64_t, T*>();
  for (int64_t b0 = 0; b0 < s.B; b0 += group) {
    Problem<T> G = P;
    G.s.B = std::min(group, s.B - b0);
    G.f.data += b0 * P.f.stride[0];
    if (dual) G.k.data += b0 * P.k.stride[0];
    G.v.data += b0 * P.v.stride[0];
    G.out.data += b0 * P.out.stride[0];
    first_pass(G, nthreads);
    run_tiles(task, G, G.s.B, s.N, kBlockQ, workspace, nthreads);
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
  run<T, AggregationTile>(P, 2.0 * s.B * n2 * static_cast<double>(s.C + s.d), threads);
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
  run<T, DualTile>(P, 2.0 * s.B * n2 * static_cast<double>(s.C + 3 * s.H * s.d), threads);
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
