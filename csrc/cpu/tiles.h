// Tile plumbing shared by the flash-style CPU kernels (attention.cpp, baseline_attention.cpp):
// strided slices, copies of tiles into zero-padded local buffers, one row of the online softmax,
// and the OpenMP loop over (outer index, tile) tasks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace armfast::cpu {

// A 2-D strided view [N, d]: one (batch, head) slice of a [B, H, N, d] tensor, or one batch of
// a [B, N, C] one.
template <typename T>
struct Slice {
  const T* p;
  int64_t sn, sd;
  ARMFAST_INLINE T at(int64_t n, int64_t c) const { return p[n * sn + c * sd]; }
};

template <typename T>
ARMFAST_INLINE Slice<T> slice(Strided<const T> t, int64_t b, int64_t h) {
  return {t.data + b * t.stride[0] + h * t.stride[1], t.stride[2], t.stride[3]};
}

// dst[i, c] = scale * src[n0 + i, c] for i < n, 0 for n <= i < rows; columns d..ld are zeroed.
template <typename T>
ARMFAST_INLINE void copy_rows(T* dst, int64_t ld, Slice<T> src, int64_t n0, int64_t n, int64_t rows,
                              int64_t d, T scale) {
  for (int64_t i = 0; i < rows; ++i) {
    T* out = dst + i * ld;
    if (i < n) {
      const T* in = src.p + (n0 + i) * src.sn;
      if (src.sd == 1) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) out[c] = in[c] * scale;
      } else {
        for (int64_t c = 0; c < d; ++c) out[c] = in[c * src.sd] * scale;
      }
    } else {
      std::fill(out, out + d, T(0));
    }
    std::fill(out + d, out + ld, T(0));
  }
}

// dst[c, i] = scale * src[n0 + i, c] for i < n, 0 for n <= i < cols. The loop runs along the
// source's smaller stride, so a column-major source (features [C, n] seen as [n, C]) reads
// contiguously too.
template <typename T>
ARMFAST_INLINE void copy_transposed(T* dst, int64_t ld, Slice<T> src, int64_t n0, int64_t n,
                                    int64_t cols, int64_t d, T scale) {
  if (src.sn < src.sd) {
    for (int64_t c = 0; c < d; ++c)
      for (int64_t i = 0; i < n; ++i) dst[c * ld + i] = src.at(n0 + i, c) * scale;
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < d; ++c) dst[c * ld + i] = src.at(n0 + i, c) * scale;
  }
  for (int64_t c = 0; c < d; ++c) std::fill(dst + c * ld + n, dst + c * ld + cols, T(0));
}

// dst[i * ld + c] = src[n0 + i, c] (times row_scale[i] if given) for i < n, c < d, looping
// along the source's smaller stride, so row-major and column-major sources both read contiguously.
template <typename T>
ARMFAST_INLINE void copy_block(T* dst, int64_t ld, Slice<T> src, int64_t n0, int64_t n, int64_t d,
                               const T* row_scale = nullptr) {
  auto put = [&](int64_t i, int64_t c) {
    const T x = src.at(n0 + i, c);
    dst[i * ld + c] = row_scale ? x * row_scale[i] : x;
  };
  if (src.sn < src.sd) {
    for (int64_t c = 0; c < d; ++c)
      for (int64_t i = 0; i < n; ++i) put(i, c);
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < d; ++c) put(i, c);
  }
}

// One row of a score tile through the online softmax. srow[0:nk] holds scores (-inf: masked);
// they become p = exp(s - m_new) in place, and srow[nk:cols] 0. The running max m and sum l are
// updated; returns alpha = exp(m_old - m_new), the factor for the row's accumulator.
template <typename T>
ARMFAST_INLINE T online_softmax_row(T* srow, int64_t nk, int64_t cols, T& m, T& l) {
  T mx = m;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < nk; ++j) mx = srow[j] > mx ? srow[j] : mx;
  // While every key of a row so far is masked, m stays -inf: exp(-inf - 0) then gives p = 0 and
  // alpha = 0 instead of NaN. Unmasked rows never see it (the first tile holds a real key).
  const T ref = mx == -std::numeric_limits<T>::infinity() ? T(0) : mx;
  const T alpha = fast_exp(m - ref);  // 0 on the first tile (m_old = -inf)
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < nk; ++j) {
    const T p = fast_exp(srow[j] - ref);
    srow[j] = p;
    sum += p;
  }
  std::fill(srow + nk, srow + cols, T(0));
  l = l * alpha + sum;
  m = mx;
  return alpha;
}

// ProxyCLIP's mask on one row of cosines srow[0:nk]: gamma * S where S >= thresh or on the
// diagonal (the key index `diagonal` in this tile, if any), -inf elsewhere. S is compared in T.
template <typename T>
ARMFAST_INLINE void mask_affinity_row(T* srow, int64_t nk, T thresh, T gamma, int64_t diagonal) {
#pragma omp simd
  for (int64_t j = 0; j < nk; ++j)
    srow[j] = srow[j] >= thresh || j == diagonal ? gamma * srow[j] : -std::numeric_limits<T>::infinity();
}

// Runs `tile(P, outer, tile_index * block, workspace)` for every (outer < n_outer, tile of
// `block` over n) on up to `threads` OpenMP threads, each with its own workspace of `ws_elems`
// elements. Every task writes its own part of the output: no atomics, and the results do not
// depend on the thread count or schedule.
template <typename Problem, typename T>
void run_tiles(void (*tile)(const Problem*, int64_t, int64_t, T*), const Problem& P,
               int64_t n_outer, int64_t n, int64_t block, int64_t ws_elems, int threads) {
  const int64_t ntiles = (n + block - 1) / block, tasks = n_outer * ntiles;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  const int64_t stride = round_up(ws_elems, 64);  // keeps each thread's buffer on its own lines
  std::vector<T> ws(static_cast<size_t>(stride * nthreads));
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    T* w = ws.data() + stride * omp_get_thread_num();
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) tile(&P, t / ntiles, (t % ntiles) * block, w);
  }
}

}  // namespace armfast::cpu
