// Entry points of the CPU kernels (armfast._C). Plain pointers and element strides, no libtorch.
#pragma once

#include <cstdint>

#include "armfast/baseline_shapes.h"

namespace armfast::cpu {

// A strided tensor of up to 4 dims: element (i0, i1, ...) lives at data[i0*stride[0] + ...].
template <typename T>
struct Strided {
  T* data;
  int64_t stride[4];
};

struct AttentionShape {
  int64_t B, H, Nq, Nk, d;
};

struct LogitsShape {
  int64_t B, N, C, E;
};

// q [B,H,Nq,d], k/v [B,H,Nk,d] -> out [B,H,Nq,d], lse [B,H,Nq] (natural log-sum-exp of each row
// of scaled scores). T is float or double; threads <= 0 means OpenMP's default.
template <typename T>
void attention_forward(const AttentionShape& s, Strided<const T> q, Strided<const T> k,
                       Strided<const T> v, Strided<T> out, Strided<T> lse, double scale, int threads);

// Gradients of attention from the saved out and lse; dq/dk/dv are written, never accumulated.
template <typename T>
void attention_backward(const AttentionShape& s, Strided<const T> dout, Strided<const T> q,
                        Strided<const T> k, Strided<const T> v, Strided<const T> out,
                        Strided<const T> lse, Strided<T> dq, Strided<T> dk, Strided<T> dv,
                        double scale, int threads);

// x [B,N,E], text [C,E] -> out [B,N,C] = logit_scale * normalize(x) normalize(text)^T.
template <typename T>
void patch_text_logits_forward(const LogitsShape& s, Strided<const T> x, Strided<const T> text,
                               Strided<T> out, double logit_scale, int threads);

// Writes dx [B,N,E] and dtext [C,E]; returns d(loss)/d(logit_scale).
template <typename T>
double patch_text_logits_backward(const LogitsShape& s, Strided<const T> dout, Strided<const T> x,
                                  Strided<const T> text, double logit_scale, Strided<T> dx,
                                  Strided<T> dtext, int threads);

// ---- the baseline attentions (baseline_attention.cpp), forward only --------------------------

using armfast::AffinityShape;  // armfast/baseline_shapes.h
using armfast::GridBias;
using armfast::SelfCorrelationShape;

// x, v, out [B,H,N,d]: out = softmax(scale x x^T + G) v, G from `bias` (nullptr: none). With a
// second operand (x2.data != nullptr; bias must then be nullptr), SCLIP's
// out = (softmax(scale x x^T) + softmax(scale x2 x2^T)) v.
template <typename T>
void self_correlation_forward(const SelfCorrelationShape& s, Strided<const T> x,
                              Strided<const T> x2, Strided<const T> v, Strided<T> out,
                              double scale, const GridBias* bias, int threads);

// ProxyCLIP: out[b, h] = softmax(gamma S, S < beta mean(S) masked off the diagonal) v[b, h] with
// S the cosine affinities of the rows of f[b] and mean(S) over all n x n pairs.
template <typename T>
void masked_affinity_forward(const AffinityShape& s, Strided<const T> f, Strided<const T> v,
                             Strided<T> out, double beta, double gamma, int threads);

// Instruction set the kernels dispatch to: "avx512", "avx2" or "generic". The best the CPU
// supports, capped by the environment variable ARMFAST_CPU_ISA (for tests and comparisons).
const char* active_isa();

// The measured peak of the vector FMA units (peak.cpp): `iterations` rounds of FmaPeak::chains
// independent vector FMAs on each of `threads` OpenMP threads (<= 0: OpenMP's default).
struct FmaPeak {
  double flops;     // 2 per lane per FMA, all threads together
  double seconds;   // wall time of the parallel region
  int threads, chains, lanes;
  double checksum;  // sum of the accumulators: returned, so no FMA can be optimised away
};
template <typename T>
FmaPeak fma_peak(int64_t iterations, int threads);

}  // namespace armfast::cpu
