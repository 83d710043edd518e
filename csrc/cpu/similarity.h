// SC-CLIP's ops on the CPU (similarity.cpp), forward only, with no N x N buffer.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace armfast::cpu {

// f [B, N, C]; the values and the output [B, H, N, d] (similarity aggregation: H = 1, d = D).
struct SimilarityShape {
  int64_t B, N, C, H, d;
};

// x, out [B, N, D] (s.H == 1, s.d == D): out = W x / (rowsum(W) + 1e-6), W = S [S >= threshold],
// S the cosines of the rows of f[b], computed and thresholded in T.
template <typename T>
void similarity_aggregation_forward(const SimilarityShape& s, Strided<const T> f,
                                    Strided<const T> x, Strided<T> out, double threshold,
                                    int threads);

// k, v, out [B, H, N, d]: out[b, h] = ((P_mask + softmax(scale k k^T)) / 2) v[b, h], P_mask =
// softmax(gamma S) with S < beta mean(S) masked off the diagonal, mean(S) over all N x N pairs.
template <typename T>
void averaged_dual_softmax_forward(const SimilarityShape& s, Strided<const T> f,
                                   Strided<const T> k, Strided<const T> v, Strided<T> out,
                                   double scale, double beta, double gamma, int threads);

}  // namespace armfast::cpu
