// Cosine patch-text logits on the CPU: out = s * normalize(x) normalize(text)^T, and its backward.
//
// Forward: normalise text once into a transposed, padded buffer, then each task normalises a
// block of x rows and runs one GEMM against it. Backward (math as in armfast/ops/_reference.py,
// with the norm clamped at 1e-12 and constant below the clamp):
//   y = dout normalize(text)          dx = s (y - [|x| >= eps] x_hat <y, x_hat>) / max(|x|, eps)
//   z = dout^T normalize(x) (over B,N) dtext = s (z - [|t| >= eps] t_hat <z, t_hat>) / max(|t|, eps)
//   dlogit_scale = sum(dout * cos) = sum over rows of <y, x_hat>
// dx tasks own rows, dtext tasks own classes and sum over rows in a fixed order: deterministic.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "isa.h"
#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace armfast::cpu {
namespace {

constexpr int64_t kRows = 64;     // x rows (flattened B*N) per task
constexpr int64_t kClasses = 16;  // classes per dtext task (a multiple of every Isa::R)
constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize

template <typename T>
struct Problem {
  LogitsShape s;
  Strided<const T> x, text, dout;
  Strided<T> out, dx, dtext;
  T scale;
  int64_t Cp, Ep;  // C and E rounded up to the widest vector
  T* tn_t;         // forward:  [E, Cp] normalize(text)^T
  T* tn;           // backward: [C, Ep] normalize(text)
  T* xn;           // backward: [B*N, Ep] normalize(x)
  T *rx, *mx, *rt, *mt;  // clamped norms and masks [|row| >= eps] of x rows and text rows
  T* dots;               // backward: [B*N] <y, x_hat>
};

template <typename T>
ARMFAST_INLINE const T* x_row(const Problem<T>& P, int64_t r) {
  return P.x.data + (r / P.s.N) * P.x.stride[0] + (r % P.s.N) * P.x.stride[1];
}
template <typename T>
ARMFAST_INLINE const T* g_row(const Problem<T>& P, int64_t r) {
  return P.dout.data + (r / P.s.N) * P.dout.stride[0] + (r % P.s.N) * P.dout.stride[1];
}

// Norm of a strided row, accumulated in double; returns max(norm, eps) and sets mask.
template <typename T>
T clamped_norm(const T* row, int64_t n, int64_t stride, T* mask) {
  double ss = 0;
  for (int64_t e = 0; e < n; ++e) ss += static_cast<double>(row[e * stride]) * row[e * stride];
  const double norm = std::sqrt(ss);
  *mask = norm >= kNormEps ? T(1) : T(0);
  return static_cast<T>(std::max(norm, kNormEps));
}

// Normalises every text row into tn_t (transposed, forward) or tn (row-major, backward).
template <typename T>
void normalize_text(Problem<T>& P, bool transposed, int threads) {
  const int64_t C = P.s.C, E = P.s.E;
  const int64_t se = P.text.stride[1];
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t c = 0; c < C; ++c) {
    const T* t = P.text.data + c * P.text.stride[0];
    const T r = clamped_norm(t, E, se, P.mt + c);
    P.rt[c] = r;
    if (transposed) {
      for (int64_t e = 0; e < E; ++e) P.tn_t[e * P.Cp + c] = t[e * se] / r;
    } else {
      T* out = P.tn + c * P.Ep;
      for (int64_t e = 0; e < E; ++e) out[e] = t[e * se] / r;
      std::fill(out + E, out + P.Ep, T(0));
    }
  }
  if (transposed)
    for (int64_t e = 0; e < E; ++e) std::fill(P.tn_t + e * P.Cp + C, P.tn_t + (e + 1) * P.Cp, T(0));
}

struct ForwardRows {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t r0, T* ws) {
    const int64_t E = P->s.E, C = P->s.C, Cp = P->Cp;
    const int64_t nr = min_of(kRows, P->s.B * P->s.N - r0), rows = round_up(nr, Isa::R);
    T* xs = ws;                // [kRows, E]  normalize(x) rows
    T* os = xs + kRows * E;    // [kRows, Cp] cosines
    const int64_t se = P->x.stride[2];
    for (int64_t i = 0; i < nr; ++i) {
      const T* x = x_row(*P, r0 + i);
      T mask;
      const T r = clamped_norm(x, E, se, &mask);
      for (int64_t e = 0; e < E; ++e) xs[i * E + e] = x[e * se] / r;
    }
    std::fill(xs + nr * E, xs + rows * E, T(0));
    gemm<T, Isa>(rows, Cp, E, xs, E, P->tn_t, Cp, os, Cp, false);
    const Strided<T>& o = P->out;
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = r0 + i;
      T* orow = o.data + (r / P->s.N) * o.stride[0] + (r % P->s.N) * o.stride[1];
      for (int64_t c = 0; c < C; ++c) orow[c * o.stride[2]] = P->scale * os[i * Cp + c];
    }
  }
};

// dx for a block of rows: y = dout normalize(text) as one GEMM, then the per-row projection.
struct BackwardRows {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t r0, T* ws) {
    const int64_t E = P->s.E, C = P->s.C, Ep = P->Ep;
    const int64_t nr = min_of(kRows, P->s.B * P->s.N - r0), rows = round_up(nr, Isa::R);
    T* gs = ws;               // [kRows, C]  dout rows
    T* ys = gs + kRows * C;   // [kRows, Ep] y
    const int64_t sc = P->dout.stride[2];
    for (int64_t i = 0; i < rows; ++i) {
      if (i < nr) {
        const T* g = g_row(*P, r0 + i);
        for (int64_t c = 0; c < C; ++c) gs[i * C + c] = g[c * sc];
      } else {
        std::fill(gs + i * C, gs + (i + 1) * C, T(0));
      }
    }
    gemm<T, Isa>(rows, Ep, C, gs, C, P->tn, Ep, ys, Ep, false);
    const Strided<T>& gx = P->dx;
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = r0 + i;
      const T* y = ys + i * Ep;
      const T* xn = P->xn + r * Ep;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t e = 0; e < E; ++e) dot += y[e] * xn[e];
      P->dots[r] = dot;
      const T proj = P->mx[r] * dot, f = P->scale / P->rx[r];
      T* out = gx.data + (r / P->s.N) * gx.stride[0] + (r % P->s.N) * gx.stride[1];
      for (int64_t e = 0; e < E; ++e) out[e * gx.stride[2]] = f * (y[e] - proj * xn[e]);
    }
  }
};

// dtext for a block of classes: z = dout^T normalize(x), summed over all rows in order.
struct BackwardClasses {
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(const Problem<T>* P, int64_t c0, T* ws) {
    const int64_t E = P->s.E, Ep = P->Ep, BN = P->s.B * P->s.N;
    const int64_t nc = min_of(kClasses, P->s.C - c0), rows = round_up(nc, Isa::R);
    T* zs = ws;                    // [kClasses, Ep]    z
    T* gt = zs + kClasses * Ep;    // [kClasses, kRows] dout^T block
    std::fill(zs, zs + rows * Ep, T(0));
    std::fill(gt, gt + kClasses * kRows, T(0));
    const int64_t sc = P->dout.stride[2];
    for (int64_t r0 = 0; r0 < BN; r0 += kRows) {
      const int64_t nr = min_of(kRows, BN - r0);
      for (int64_t i = 0; i < nr; ++i) {
        const T* g = g_row(*P, r0 + i);
        for (int64_t j = 0; j < nc; ++j) gt[j * kRows + i] = g[(c0 + j) * sc];
      }
      gemm<T, Isa>(rows, Ep, nr, gt, kRows, P->xn + r0 * Ep, Ep, zs, Ep, true);
    }
    const Strided<T>& gtext = P->dtext;
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t c = c0 + j;
      const T* z = zs + j * Ep;
      const T* tn = P->tn + c * Ep;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t e = 0; e < E; ++e) dot += z[e] * tn[e];
      const T proj = P->mt[c] * dot, f = P->scale / P->rt[c];
      T* out = gtext.data + c * gtext.stride[0];
      for (int64_t e = 0; e < E; ++e) out[e * gtext.stride[1]] = f * (z[e] - proj * tn[e]);
    }
  }
};

// Runs tile(P, i * block, workspace) for i < ceil(n / block) on `threads` threads.
template <typename T>
void run_blocks(void (*tile)(const Problem<T>*, int64_t, T*), const Problem<T>& P, int64_t n,
                int64_t block, int64_t ws_elems, int threads) {
  const int64_t tasks = (n + block - 1) / block;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  const int64_t stride = round_up(ws_elems, 64);
  std::vector<T> ws(static_cast<size_t>(stride * nthreads));
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    T* w = ws.data() + stride * omp_get_thread_num();
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) tile(&P, t * block, w);
  }
}

double logits_flops(const LogitsShape& s) {
  return 2.0 * static_cast<double>(s.B * s.N) * static_cast<double>(s.C) * static_cast<double>(s.E);
}

}  // namespace

template <typename T>
void patch_text_logits_forward(const LogitsShape& s, Strided<const T> x, Strided<const T> text,
                               Strided<T> out, double logit_scale, int threads) {
  threads = threads_for(threads, logits_flops(s));
  Problem<T> P{};
  P.s = s, P.x = x, P.text = text, P.out = out;
  P.scale = static_cast<T>(logit_scale);
  P.Cp = round_up(s.C, kMaxLanes<T>);
  std::vector<T> tn_t(static_cast<size_t>(s.E * P.Cp)), norms(static_cast<size_t>(2 * s.C));
  P.tn_t = tn_t.data(), P.rt = norms.data(), P.mt = norms.data() + s.C;
  normalize_text(P, /*transposed=*/true, threads);
  auto tile = isa_kernel<ForwardRows, const Problem<T>*, int64_t, T*>();
  run_blocks<T>(tile, P, s.B * s.N, kRows, kRows * (s.E + P.Cp), threads);
}

template <typename T>
double patch_text_logits_backward(const LogitsShape& s, Strided<const T> dout, Strided<const T> x,
                                  Strided<const T> text, double logit_scale, Strided<T> dx,
                                  Strided<T> dtext, int threads) {
  threads = threads_for(threads, 2 * logits_flops(s));
  const int64_t BN = s.B * s.N;
  Problem<T> P{};
  P.s = s, P.x = x, P.text = text, P.dout = dout, P.dx = dx, P.dtext = dtext;
  P.scale = static_cast<T>(logit_scale);
  P.Ep = round_up(s.E, kMaxLanes<T>);
  std::vector<T> tn(static_cast<size_t>(s.C * P.Ep)), xn(static_cast<size_t>(BN * P.Ep));
  std::vector<T> small(static_cast<size_t>(2 * s.C + 3 * BN));
  P.tn = tn.data(), P.xn = xn.data();
  P.rt = small.data(), P.mt = P.rt + s.C, P.rx = P.mt + s.C, P.mx = P.rx + BN, P.dots = P.mx + BN;
  normalize_text(P, /*transposed=*/false, threads);
  const int64_t se = x.stride[2];
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t r = 0; r < BN; ++r) {
    const T* row = x_row(P, r);
    const T rx = clamped_norm(row, s.E, se, P.mx + r);
    P.rx[r] = rx;
    T* out = P.xn + r * P.Ep;
    for (int64_t e = 0; e < s.E; ++e) out[e] = row[e * se] / rx;
    std::fill(out + s.E, out + P.Ep, T(0));
  }
  auto rows = isa_kernel<BackwardRows, const Problem<T>*, int64_t, T*>();
  run_blocks<T>(rows, P, BN, kRows, kRows * (s.C + P.Ep), threads);
  if (dtext.data != nullptr) {  // null: text needs no gradient (e.g. frozen class embeddings)
    auto classes = isa_kernel<BackwardClasses, const Problem<T>*, int64_t, T*>();
    run_blocks<T>(classes, P, s.C, kClasses, kClasses * (P.Ep + kRows), threads);
  }
  double dscale = 0;  // a fixed-order sum: the same result for any thread count
  for (int64_t r = 0; r < BN; ++r) dscale += static_cast<double>(P.dots[r]);
  return dscale;
}

#define ARMFAST_INSTANTIATE(T)                                                                    \
  template void patch_text_logits_forward<T>(const LogitsShape&, Strided<const T>,                \
                                             Strided<const T>, Strided<T>, double, int);          \
  template double patch_text_logits_backward<T>(const LogitsShape&, Strided<const T>,             \
                                                Strided<const T>, Strided<const T>, double,       \
                                                Strided<T>, Strided<T>, int);
ARMFAST_INSTANTIATE(float)
ARMFAST_INSTANTIATE(double)
#undef ARMFAST_INSTANTIATE

}  // namespace armfast::cpu
