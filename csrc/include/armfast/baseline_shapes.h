// Shapes of the baseline attentions' kernels, shared by the CPU (armfast._C) and CUDA
// (armfast._C_cuda) entry points: plain structs, no dependencies.
#pragma once

#include <cstdint>

namespace armfast {

struct SelfCorrelationShape {
  int64_t B, H, N, d;  // x, v, out [B, H, N, d]
};

// NACLIP's neighbourhood term: tokens are the patches of an h x w grid in row-major order, after
// a class token when class_token; G = exp(-dist^2 / (2 sigma^2)), 0 on the class token.
struct GridBias {
  int64_t h, w;
  bool class_token;
  double sigma;
};

struct AffinityShape {
  int64_t B, n, C, H, d;  // f [B, n, C], v and out [B, H, n, d]
};

}  // namespace armfast
