// ProxyCLIP's masked-affinity attention on the CPU, forward only: flash-style tiles with an online
// softmax, and no n x n buffer anywhere (the self-correlation baselines: self_correlation.cpp).
//
// masked_affinity_forward (ProxyCLIP): S = cos(f_i, f_j), S < beta mean(S) masked (never the
//   diagonal), softmax(gamma S) online, applied to all heads at once (one accumulator row of H*d
//   per query), since the map is shared by every head. An O(n C) first pass takes each row's
//   inverse norm and mean(S) = |mean_i f_i / |f_i||^2 per image, and packs the normalised features
//   once per image as [C, 64] key panels (and the values, unless P V can read them in place).
//   With a batch that fills the threads, one task per image computes each tile of the symmetric
//   S once for two row blocks; otherwise one task per (image, query tile) walks over the key
//   tiles. Both paths run the same arithmetic in the same order.
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

// ---- masked affinity: ProxyCLIP ----------------------------------------------------------------

// The tile path's images run in groups whose packed operands take about this many bytes, so the
// buffers stay in the last-level cache and the allocator reuses them between calls.
constexpr int64_t kPackBytes = int64_t(16) << 20;
static_assert(kBlockQ == kBlockK, "a tile of S serves its row block and, transposed, its key block");

template <typename T>
struct AffinityProblem {
  AffinityShape s;  // s.B: the images of this call (of the group, on the tile path)
  Slice<T> f;       // image 0's features [n, C]; image b starts at f.p + b * fb
  int64_t fb;
  Strided<const T> v;  // image 0's values and output
  Strided<T> out;
  bool v_in_place;  // P V reads v itself: unit column stride, d a multiple of every vector width
  int64_t dv;       // columns of one head's values as P V reads them (d, or d padded if packed)
  int64_t tiles, panel_elems, value_elems;  // key tiles; packed features and values per image
  double beta;
  T gamma;
  T *panels, *values, *rnorm, *thresh;  // the tile path's packed operands of the group
  // PackAffinityTile for this CPU's instruction set
  void (*pack)(const AffinityProblem*, int64_t b, int64_t t, T* panels, T* values, T* rnorm,
               double* mean);
};

// One image's operands as the products read them.
template <typename T>
struct AffinityOperands {
  Slice<T> f;       // features [n, C]
  const T* rnorm;   // [n] 1 / max(|f_i|, eps)
  const T* panels;  // normalised features, a [C, kBlockK] panel per key tile (transposed,
                    // zero-padded): the right operand of S = F F^T
  const T* v;       // head h: the [n, dv] matrix at v + h * vh, rows vn apart, unit column stride
  int64_t vh, vn;
  T thresh;  // beta * mean(S)
};

// Image b's operands, in `panels`, `values` (unless v is read in place), `rnorm` and `thresh`
// laid out for that image by the first pass.
template <typename T>
AffinityOperands<T> affinity_operands(const AffinityProblem<T>& P, int64_t b, const T* panels,
                                      const T* values, const T* rnorm, T thresh) {
  AffinityOperands<T> im{{P.f.p + b * P.fb, P.f.sn, P.f.sd}, rnorm, panels};
  if (P.v_in_place) {
    im.v = P.v.data + b * P.v.stride[0], im.vh = P.v.stride[1], im.vn = P.v.stride[2];
  } else {  // [n, H * dv]: a row holds every head, as the accumulator
    im.v = values, im.vh = P.dv, im.vn = P.s.H * P.dv;
  }
  im.thresh = thresh;
  return im;
}

// Rows k0..k0+nk of one image's features f [n, C]: their inverse norms rn[0:nk], their panel
// [C, kBlockK] of normalised features (columns nk.. zero), and mean[c] = the sum of the panel's
// row c (double). The norms run along f's smaller stride (1 when UNIT: the loops then vectorise
// without gathers); the panel is written row by row, each a contiguous run (a gather of one
// feature over the rows when f is row-major: the tile's rows stay in L1 across features).
template <typename T, bool UNIT>
ARMFAST_INLINE void pack_feature_tile(Slice<T> f, int64_t k0, int64_t nk, int64_t C, T* rn,
                                      T* panel, double* mean) {
  const bool rows_contiguous = f.sd <= f.sn;
  const int64_t sd = UNIT && rows_contiguous ? 1 : f.sd, sn = UNIT && !rows_contiguous ? 1 : f.sn;
  double sq[kBlockK] = {};
  if (rows_contiguous) {
    for (int64_t j = 0; j < nk; ++j) {
      const T* row = f.p + (k0 + j) * sn;
      double sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(row[c * sd]) * row[c * sd];
      sq[j] = sum;
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const T* col = f.p + k0 * sn + c * sd;
#pragma omp simd
      for (int64_t j = 0; j < nk; ++j) sq[j] += static_cast<double>(col[j * sn]) * col[j * sn];
    }
  }
  for (int64_t j = 0; j < nk; ++j) rn[j] = static_cast<T>(1.0 / std::max(std::sqrt(sq[j]), kNormEps));
  for (int64_t c = 0; c < C; ++c) {
    const T* col = f.p + k0 * sn + c * sd;
    T* dst = panel + c * kBlockK;
    double m = 0;
#pragma omp simd reduction(+ : m)
    for (int64_t j = 0; j < nk; ++j) {
      const T x = col[j * sn] * rn[j];
      dst[j] = x;
      m += x;
    }
    mean[c] = m;
    std::fill(dst + nk, dst + kBlockK, T(0));
  }
}

// The first pass for key tile t of image b into that image's buffers: pack_feature_tile, and the
// tile's rows of the values unless P V reads them in place (columns d..dv zero). Both paths call
// it through AffinityProblem::pack, one compiled function per instruction set, so that they pack
// the same bits.
struct PackAffinityTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const AffinityProblem<T>* P, int64_t b, int64_t t, T* panels,
                                 T* values, T* rnorm, double* mean) {
    const AffinityShape& s = P->s;
    const int64_t k0 = t * kBlockK, nk = min_of(kBlockK, s.n - k0);
    const Slice<T> f{P->f.p + b * P->fb, P->f.sn, P->f.sd};
    if (std::min(f.sn, f.sd) == 1)
      pack_feature_tile<T, true>(f, k0, nk, s.C, rnorm + k0, panels + t * s.C * kBlockK, mean);
    else
      pack_feature_tile<T, false>(f, k0, nk, s.C, rnorm + k0, panels + t * s.C * kBlockK, mean);
    if (P->v_in_place) return;
    const int64_t vn = s.H * P->dv;
    for (int64_t h = 0; h < s.H; ++h) {
      T* dst = values + h * P->dv + k0 * vn;
      copy_block(dst, vn, slice(P->v, b, h), k0, nk, s.d);
      for (int64_t j = 0; j < nk; ++j) std::fill(dst + j * vn + s.d, dst + j * vn + P->dv, T(0));
    }
  }
};

// beta * mean(S) of one image from its tiles' sums of normalised features (`partial`, [tiles, C]):
// mean(S) = |mean_i f_i rnorm_i|^2, the mean of all n x n cosines; the tiles added in order.
template <typename T>
T affinity_threshold(const double* partial, int64_t tiles, int64_t C, int64_t n, double beta) {
  double sq = 0;
  for (int64_t c = 0; c < C; ++c) {
    double mean = 0;
    for (int64_t t = 0; t < tiles; ++t) mean += partial[t * C + c];
    sq += mean * mean;
  }
  return static_cast<T>(beta * sq / (static_cast<double>(n) * n));
}

// sc[0:rows, 0:cols] = S of `rows` normalised query features fs [rows, C] and a key panel [C, BK].
template <class Isa, typename T>
ARMFAST_INLINE void affinity_scores(const T* fs, int64_t rows, int64_t C, const T* panel,
                                    int64_t cols, T* sc) {
  for (int64_t c0 = 0; c0 < C; c0 += kChunk)
    gemm<T, Isa>(rows, cols, min_of(kChunk, C - c0), fs + c0, C, panel + c0 * kBlockK, kBlockK, sc,
                 kBlockK, c0 > 0);
}

// Rows r0..r0+nr of an image take keys k0..k0+nk: their S (tile [nr, nk], pitch kBlockK, rows
// nr..round_up(nr, R) zero) masked where S < beta mean(S) but never on the diagonal, the online
// softmax of gamma (S - beta mean(S)) into the rows' states m, l (from r0) and acc (from row r0,
// pitch H * dv), then P V for every head at once (the map is shared by all heads).
template <class Isa, typename T>
ARMFAST_INLINE void affinity_update(const AffinityOperands<T>& im, const AffinityProblem<T>* P,
                                    T* tile, int64_t r0, int64_t nr, int64_t k0, int64_t nk, T* m,
                                    T* l, T* acc) {
  constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
  const int64_t dv = P->dv, hdv = P->s.H * dv, cols = round_up(nk, W);
  const T thresh = im.thresh, gamma = P->gamma;
  for (int64_t i = 0; i < nr; ++i) {
    T* srow = tile + i * kBlockK;
    const int64_t diagonal = r0 + i - k0;  // the key index of S_ii in this tile, if any
    // gamma (S - beta mean(S)), masked where below 0, as the reference writes it: the same
    // softmax as gamma S (a shift per row), and a NaN threshold (a NaN feature anywhere in the
    // image) makes every row NaN through its diagonal, as it does the reference's
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j)
      srow[j] = srow[j] < thresh && j != diagonal ? kNegInf<T> : gamma * (srow[j] - thresh);
    const T alpha = online_softmax_row(srow, nk, cols, m[i], l[i]);
    if (alpha != T(1)) {  // once a row's maximum has settled, most tiles leave it alone
      T* orow = acc + i * hdv;
#pragma omp simd
      for (int64_t c = 0; c < hdv; ++c) orow[c] *= alpha;
    }
  }
  for (int64_t h = 0; h < P->s.H; ++h)
    gemm<T, Isa>(round_up(nr, R), dv, nk, tile, kBlockK, im.v + h * im.vh + k0 * im.vn, im.vn,
                 acc + h * dv, hdv, true);
}

// out[b, :, r0:r0+nr] = acc / l, head by head.
template <typename T>
ARMFAST_INLINE void affinity_write(const AffinityProblem<T>* P, int64_t b, int64_t r0, int64_t nr,
                                   const T* acc, const T* l) {
  const Strided<T>& o = P->out;
  const int64_t d = P->s.d, dv = P->dv, hdv = P->s.H * dv, se = o.stride[3];
  for (int64_t h = 0; h < P->s.H; ++h) {
    T* ob = o.data + b * o.stride[0] + h * o.stride[1];
    for (int64_t i = 0; i < nr; ++i) {
      const T inv = T(1) / l[i];  // >= 1 term: the diagonal is never masked
      const T* arow = acc + i * hdv + h * dv;
      T* orow = ob + (r0 + i) * o.stride[2];
      if (se == 1) {
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) orow[e] = arow[e] * inv;
      } else {
        for (int64_t e = 0; e < d; ++e) orow[e * se] = arow[e] * inv;
      }
    }
  }
}

// Normalised features of rows r0..r0+nr into fs [rows, C], rows nr..rows zero.
template <typename T>
ARMFAST_INLINE void affinity_queries(const AffinityOperands<T>& im, int64_t C, int64_t r0,
                                     int64_t nr, int64_t rows, T* fs) {
  copy_block(fs, C, im.f, r0, nr, C, im.rnorm + r0);
  std::fill(fs + nr * C, fs + rows * C, T(0));
}

int64_t affinity_tile_workspace(int64_t C, int64_t hdv) {
  return kBlockQ * C + kBlockQ * kBlockK + kBlockQ * hdv + 2 * kBlockQ;
}

// Tile path, one (image, query tile) task over the operands of the group's first pass: the
// query rows walk over every key tile.
struct AffinityTile {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const AffinityProblem<T>* P, int64_t b, int64_t q0, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const AffinityShape& s = P->s;
    const int64_t C = s.C, n = s.n, hdv = s.H * P->dv;
    const int64_t nq = min_of(kBlockQ, n - q0), rows = round_up(nq, R);
    T* fs = ws;                       // [BQ, C]   normalised query features
    T* sc = fs + kBlockQ * C;         // [BQ, BK]  S, then probabilities
    T* acc = sc + kBlockQ * kBlockK;  // [BQ, hdv] unnormalised output of every head
    T* m = acc + kBlockQ * hdv;       // [BQ]      running max
    T* l = m + kBlockQ;               // [BQ]      running sum
    const AffinityOperands<T> im = affinity_operands(
        *P, b, P->panels + b * P->panel_elems, P->values + b * P->value_elems, P->rnorm + b * n,
        P->thresh[b]);
    affinity_queries(im, C, q0, nq, rows, fs);
    std::fill(acc, acc + rows * hdv, T(0));
    std::fill(m, m + rows, kNegInf<T>);
    std::fill(l, l + rows, T(0));
    for (int64_t t = 0; t < P->tiles; ++t) {
      const int64_t k0 = t * kBlockK, nk = min_of(kBlockK, n - k0);
      affinity_scores<Isa>(fs, rows, C, im.panels + t * C * kBlockK, round_up(nk, W), sc);
      affinity_update<Isa>(im, P, sc, q0, nq, k0, nk, m, l, acc);
    }
    affinity_write(P, b, q0, nq, acc, l);
  }
};

template <typename T>
int64_t affinity_image_workspace(const AffinityProblem<T>& P) {
  const int64_t rows = P.tiles * kBlockQ, hdv = P.s.H * P.dv;
  return P.panel_elems + P.value_elems + P.s.n + kBlockQ * P.s.C + 2 * kBlockQ * kBlockK +
         rows * hdv + 2 * rows;
}

// Image path, one task per image: its own first pass, then each tile (I, J >= I) of the
// symmetric S once, for rows I (keys J) and, transposed, rows J (keys I). Every row still takes
// its key tiles in increasing order with the same arithmetic as on the tile path (S_ij and S_ji
// are the same sums of the same products), so both paths give the same bits.
struct AffinityImage {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const AffinityProblem<T>* P, int64_t b, int64_t, T* ws) {
    constexpr int64_t R = Isa::R, W = Isa::VBYTES / sizeof(T);
    const AffinityShape& s = P->s;
    const int64_t C = s.C, n = s.n, tiles = P->tiles, hdv = s.H * P->dv, nrows = tiles * kBlockQ;
    T* panels = ws;                          // this image's packed operands
    T* values = panels + P->panel_elems;
    T* rnorm = values + P->value_elems;      // [n]
    T* fs = rnorm + n;                       // [BQ, C]        normalised features of rows I
    T* sc = fs + kBlockQ * C;                // [BQ, BK]       S_IJ, then probabilities
    T* st = sc + kBlockQ * kBlockK;          // [BK, BQ]       S_JI = S_IJ^T, then probabilities
    T* acc = st + kBlockK * kBlockQ;         // [nrows, hdv]   unnormalised output of every row
    T* m = acc + nrows * hdv;                // [nrows]
    T* l = m + nrows;                        // [nrows]
    std::vector<double> partial(static_cast<size_t>(tiles * C));
    for (int64_t t = 0; t < tiles; ++t)
      P->pack(P, b, t, panels, values, rnorm, partial.data() + t * C);
    const AffinityOperands<T> im = affinity_operands(
        *P, b, panels, values, rnorm, affinity_threshold<T>(partial.data(), tiles, C, n, P->beta));
    std::fill(acc, acc + nrows * hdv, T(0));
    std::fill(m, m + nrows, kNegInf<T>);
    std::fill(l, l + nrows, T(0));
    for (int64_t I = 0; I < tiles; ++I) {
      const int64_t i0 = I * kBlockQ, ni = min_of(kBlockQ, n - i0);
      affinity_queries(im, C, i0, ni, round_up(ni, R), fs);
      for (int64_t J = I; J < tiles; ++J) {
        const int64_t j0 = J * kBlockK, nj = min_of(kBlockK, n - j0);
        affinity_scores<Isa>(fs, round_up(ni, R), C, im.panels + J * C * kBlockK, round_up(nj, W), sc);
        if (J > I) {
          for (int64_t j = 0; j < nj; ++j)
            for (int64_t i = 0; i < ni; ++i) st[j * kBlockQ + i] = sc[i * kBlockK + j];
          std::fill(st + nj * kBlockQ, st + round_up(nj, R) * kBlockQ, T(0));
        }
        affinity_update<Isa>(im, P, sc, i0, ni, j0, nj, m + i0, l + i0, acc + i0 * hdv);
        if (J > I) affinity_update<Isa>(im, P, st, j0, nj, i0, ni, m + j0, l + j0, acc + j0 * hdv);
      }
    }
    affinity_write(P, b, 0, n, acc, l);
  }
};

// The tile path's first pass over a group, one task per (image, key tile), then each image's
// threshold from its tiles' sums in a fixed order.
template <typename T>
void affinity_first_pass(const AffinityProblem<T>& P, int threads) {
  const AffinityShape& s = P.s;
  const int64_t C = s.C, tiles = P.tiles;
  std::vector<double> partial(static_cast<size_t>(s.B * tiles * C));
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (threads > 1)
  for (int64_t bt = 0; bt < s.B * tiles; ++bt) {
    const int64_t b = bt / tiles;
    P.pack(&P, b, bt % tiles, P.panels + b * P.panel_elems, P.values + b * P.value_elems,
           P.rnorm + b * s.n, partial.data() + bt * C);
  }
  for (int64_t b = 0; b < s.B; ++b)
    P.thresh[b] = affinity_threshold<T>(partial.data() + b * tiles * C, tiles, C, s.n, P.beta);
}

}  // namespace

template <typename T>
void masked_affinity_forward(const AffinityShape& s, Strided<const T> f, Strided<const T> v,
                             Strided<T> out, double beta, double gamma, int threads) {
  AffinityProblem<T> P{};
  P.s = s;
  P.f = {f.data, f.stride[1], f.stride[2]};
  P.fb = f.stride[0];
  P.v = v, P.out = out;
  P.beta = beta, P.gamma = static_cast<T>(gamma);
  P.v_in_place = v.stride[3] == 1 && s.d % kMaxLanes<T> == 0;
  P.dv = P.v_in_place ? s.d : round_up(s.d, kMaxLanes<T>);
  P.tiles = (s.n + kBlockK - 1) / kBlockK;
  P.panel_elems = P.tiles * s.C * kBlockK;
  P.value_elems = P.v_in_place ? 0 : s.n * s.H * P.dv;
  P.pack = isa_kernel<PackAffinityTile, const AffinityProblem<T>*, int64_t, int64_t, T*, T*, T*,
                      double*>();
  const double flops = 2.0 * static_cast<double>(s.B) * static_cast<double>(s.n) *
                       static_cast<double>(s.n) * static_cast<double>(s.C + s.H * s.d);
  const int nthreads = threads_for(threads, flops);
  // The image path computes S once per pair of tiles (at C = H d, a quarter of the work less)
  // but cannot split an image between threads: taken when the images round up to the threads
  // with less than ~15% of a round idle.
  const int64_t rounds = (s.B + nthreads - 1) / nthreads;
  if (20 * rounds * nthreads <= 23 * s.B) {
    auto task = isa_kernel<AffinityImage, const AffinityProblem<T>*, int64_t, int64_t, T*>();
    run_tiles(task, P, s.B, 1, 1, affinity_image_workspace(P), nthreads);
    return;
  }
  // Tile path: images in groups within kPackBytes of packed operands, but with enough tasks to
  // keep every thread busy. Every element of the buffers is written by the first pass before it
  // is read: no zero-filling.
  const int64_t image_bytes =
      std::max<int64_t>(1, (P.panel_elems + P.value_elems) * static_cast<int64_t>(sizeof(T)));
  const int64_t group = std::min(s.B, std::max({int64_t(1), kPackBytes / image_bytes,
                                                (8 * nthreads + P.tiles - 1) / P.tiles}));
  std::unique_ptr<T[]> panels(new T[group * P.panel_elems]), values(new T[group * P.value_elems]),
      rnorm(new T[group * s.n]), thresh(new T[group]);
  P.panels = panels.get(), P.values = values.get(), P.rnorm = rnorm.get(), P.thresh = thresh.get();
  auto task = isa_kernel<AffinityTile, const AffinityProblem<T>*, int64_t, int64_t, T*>();
  for (int64_t b0 = 0; b0 < s.B; b0 += group) {
    AffinityProblem<T> G = P;
    G.s.B = std::min(group, s.B - b0);
    G.f.p += b0 * P.fb;
    G.v.data += b0 * v.stride[0];
    G.out.data += b0 * out.stride[0];
    affinity_first_pass(G, nthreads);
    run_tiles(task, G, G.s.B, s.n, kBlockQ, affinity_tile_workspace(s.C, s.H * P.dv), nthreads);
  }
}

#define ARMFAST_INSTANTIATE(T)                                                                     \
  template void masked_affinity_forward<T>(const AffinityShape&, Strided<const T>, Strided<const T>, \
                                           Strided<T>, double, double, int);
ARMFAST_INSTANTIATE(float)
ARMFAST_INSTANTIATE(double)
#undef ARMFAST_INSTANTIATE

}  // namespace armfast::cpu
