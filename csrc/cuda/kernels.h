// Host entry points of the CUDA kernels (armfast._C_cuda). Plain pointers and element strides, no
// libtorch; every function launches on `stream` (torch's current stream) of `device` and throws
// std::runtime_error naming the kernel when a launch fails.
#pragma once

#include <cstdint>

#include "armfast/baseline_shapes.h"

namespace armfast::cuda {

enum class DType { float16, bfloat16, float32 };

// A strided tensor of up to 4 dims: element (i0, i1, ...) lives at data[i0*stride[0] + ...].
struct Strided {
  void* data;
  int64_t stride[4];
};

struct AttentionShape {
  int64_t B, H, Nq, Nk, d;
};

struct LogitsShape {
  int64_t B, N, C, E;
};

// q [B,H,Nq,d], k/v [B,H,Nk,d] -> out [B,H,Nq,d] (q's dtype), lse [B,H,Nq] (float32, natural
// log), all through their strides. d must be 32, 64 or 128. float32 runs on TF32 tensor cores
// when `allow_tf32` (torch's matmul precision allows TF32), else exactly.
void attention_forward(DType dtype, const AttentionShape& s, Strided q, Strided k, Strided v,
                       Strided out, Strided lse, float scale, bool allow_tf32, int device,
                       std::uintptr_t stream);

// float32 elements of the backward's workspace; `atomic_dq`: the call is not deterministic and
// runs on tensor cores (float16, bfloat16, or float32 with TF32), which accumulate dQ in fp32.
int64_t attention_backward_workspace(const AttentionShape& s, bool atomic_dq);

// dq, dk, dv from the saved out and lse. `deterministic`: bitwise reproducible gradients (no
// atomics; dQ in a pass of its own).
void attention_backward(DType dtype, const AttentionShape& s, Strided dout, Strided q, Strided k,
                        Strided v, Strided out, Strided lse, float* workspace, int64_t workspace_size,
                        Strided dq, Strided dk, Strided dv, float scale, bool allow_tf32,
                        bool deterministic, int device, std::uintptr_t stream);

// float32 workspace elements the patch_text_logits functions need for `rows` = B*N.
int64_t patch_text_logits_workspace(int64_t rows, int64_t classes, int64_t dim, bool backward);

// out [B,N,C] = (*logit_scale) * normalize(x) normalize(text)^T; logit_scale: one float32 on the
// device. float32 runs on TF32 tensor cores when `allow_tf32`, else exactly.
void patch_text_logits_forward(DType dtype, const LogitsShape& s, Strided x, Strided text,
                               const float* logit_scale, Strided out, float* workspace,
                               bool allow_tf32, int device, std::uintptr_t stream);

// Writes dx [B,N,E], dtext [C,E] (skipped when dtext.data is null) and dlogit_scale (one
// float32 on the device).
void patch_text_logits_backward(DType dtype, const LogitsShape& s, Strided dout, Strided x,
                                Strided text, const float* logit_scale, Strided dx, Strided dtext,
                                float* dlogit_scale, float* workspace, bool allow_tf32,
                                int device, std::uintptr_t stream);

// ---- the baseline attentions (baseline_attention.cu), forward only ------------------------------

using armfast::AffinityShape;  // armfast/baseline_shapes.h
using armfast::GridBias;
using armfast::SelfCorrelationShape;

// x, v, out [B,H,N,d] (d = 32, 64 or 128): out = softmax(scale x x^T + G) v, G from `bias`
// (nullptr: none); with a second operand (x2.data != nullptr, bias nullptr), SCLIP's
// out = (softmax(scale x x^T) + softmax(scale x2 x2^T)) v. Tensor cores: float16, bfloat16, and
// float32 on TF32 only when `allow_tf32` (else std::invalid_argument).
void self_correlation_forward(DType dtype, const SelfCorrelationShape& s, Strided x, Strided x2, Strided v,
                              Strided out, float scale, const GridBias* bias, bool allow_tf32, int device,
                              std::uintptr_t stream);

// ProxyCLIP: out[b, h] = softmax(gamma S, S < thresh[b] masked off the diagonal) v[b, h], S the
// cosines of the rows of f[b]; rnorm [B, n] = 1 / max(|f_i|, eps) and thresh [B] = beta mean(S)
// (float32 on the device, contiguous) come from a first pass. dtypes as self_correlation_forward.
// workspace: masked_affinity_workspace(s, device) float32 elements on the device (null when 0).
void masked_affinity_forward(DType dtype, const AffinityShape& s, Strided f, const float* rnorm,
                             const float* thresh, Strided v, Strided out, float gamma, float* workspace,
                             int64_t workspace_size, bool allow_tf32, int device, std::uintptr_t stream);
// float32 elements of the workspace masked_affinity_forward needs on `device` (0: none): a batch
// too small to fill the GPU splits the keys into ranges combined by a second kernel.
int64_t masked_affinity_workspace(const AffinityShape& s, int device);

// ---- SC-CLIP's similarity ops (similarity_attention.cu), forward only ------------------------------

struct AggregationShape {
  int64_t B, N, C, D;  // f [B, N, C], x and out [B, N, D]
};

struct DualSoftmaxShape {
  int64_t B, N, C, H, d;  // f [B, N, C], k, v and out [B, H, N, d]
};

// out = W x / (rowsum(W) + 1e-6), W = S [S >= threshold], S the cosines of the rows of f[b];
// rnorm [B, N] = 1 / max(|f_i|, eps) (float32 on the device, contiguous) from a first pass; writes
// rowsum(W) into rowsum [B, N] (float32, contiguous). dtypes as self_correlation_forward; S is
// float32-accurate in every dtype (3xTF32 for float32).
void similarity_aggregation_forward(DType dtype, const AggregationShape& s, Strided f, const float* rnorm,
                                    Strided x, Strided out, float* rowsum, float threshold, bool allow_tf32,
                                    int device, std::uintptr_t stream);

// out = ((softmax(A) + softmax(scale k k^T)) / 2) v per head, A = gamma (S - thresh[b]) with the
// entries A < 0 masked off the diagonal; rnorm [B, N] and thresh [B] = beta mean(S) from a first
// pass; writes both row log-sum-exps into lse_mask, lse_kk [B, H, N] (float32, contiguous). d = 32,
// 64 or 128; dtypes as similarity_aggregation_forward.
void averaged_dual_softmax_forward(DType dtype, const DualSoftmaxShape& s, Strided f, const float* rnorm,
                                   const float* thresh, Strided k, Strided v, Strided out, float* lse_mask,
                                   float* lse_kk, float scale, float gamma, bool allow_tf32, int device,
                                   std::uintptr_t stream);

// Number of CUDA devices; throws std::runtime_error when the driver cannot be used.
int cuda_device_count();

}  // namespace armfast::cuda
