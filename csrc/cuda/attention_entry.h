// The attention kernels' host entry points behind armfast::cuda::attention_forward/backward
// (attention.cu picks one per call): the tensor-core flash kernels per dtype
// (attention_tc_{f16,bf16,tf32}.cu) and the exact float32 kernels (attention_exact.cu), and the
// host helpers their launch sequences share. Plain C++.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels.h"

namespace armfast::cuda {

// ---- host helpers of every launch sequence ----------------------------------------------------
// 16-byte accesses are allowed when the inner stride is 1 and every row start is 16-byte aligned.
template <typename T>
bool vec_ok(const Strided& t) {
  constexpr int64_t e = 16 / sizeof(T);
  return t.stride[3] == 1 && reinterpret_cast<std::uintptr_t>(t.data) % 16 == 0 && t.stride[0] % e == 0 &&
         t.stride[1] % e == 0 && t.stride[2] % e == 0;
}

inline void copy_strides(int64_t* dst, const Strided& t, int n) {
  for (int i = 0; i < n; ++i) dst[i] = t.stride[i];
}

// Calls f(std::integral_constant<int, D>{}) for d = 32, 64, 128.
template <typename F>
void with_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default:
      throw std::invalid_argument("armfast CUDA attention supports head dims 32, 64, 128; got d=" + std::to_string(d));
  }
}

// What a call may use on its GPU.
struct DeviceLimits {
  int index = 0;
  size_t smem = 0;      // shared memory per block: the opt-in limit, or ARMFAST_CUDA_MAX_SHARED_MEMORY
  bool capped = false;  // smem is the environment's cap
  int sms = 1;          // streaming multiprocessors
};

constexpr const char* kSmemEnv = "ARMFAST_CUDA_MAX_SHARED_MEMORY";

// The limits of cuda:index, with the kSmemEnv cap (read on every call); in attention.cu.
DeviceLimits device_limits(int index);

// The ValueError of a call whose kernel cannot run with the shared memory the device allows.
[[noreturn]] inline void too_little_smem(const char* what, const char* dtype, int d, size_t need,
                                         const DeviceLimits& dev) {
  throw std::invalid_argument(
      std::string("armfast CUDA attention: the ") + what + " kernel for " + dtype + " with head dim " +
      std::to_string(d) + " needs " + std::to_string(need) + " bytes of shared memory per block, but cuda:" +
      std::to_string(dev.index) + " allows " + std::to_string(dev.smem) +
      (dev.capped ? std::string(" (the cap set by ") + kSmemEnv + ")" : std::string()) +
      "; use backend='triton' or backend='sdpa' for this call");
}

// The float32 backward workspace: delta = rowsum(dO * O) [B*H*Nq], then, when dQ is accumulated
// with atomics, dQ [B*H*Nq, d] at a 16-byte aligned offset.
inline int64_t dq_accum_offset(int64_t rows) { return (rows + 3) / 4 * 4; }
inline int64_t backward_workspace_size(const AttentionShape& s, bool atomic_dq) {
  const int64_t rows = s.B * s.H * s.Nq;
  return dq_accum_offset(rows) + (atomic_dq ? rows * s.d : 0);
}

// Tensor cores; T = __half, __nv_bfloat16, or float (TF32). `workspace`: backward_workspace_size.
template <typename T>
void flash_forward_cuda(const AttentionShape& s, const Strided& q, const Strided& k, const Strided& v,
                        const Strided& out, const Strided& lse, float scale, const DeviceLimits& dev,
                        std::uintptr_t stream);
template <typename T>
void flash_backward_cuda(const AttentionShape& s, const Strided& dout, const Strided& q, const Strided& k,
                         const Strided& v, const Strided& out, const Strided& lse, float* workspace,
                         const Strided& dq, const Strided& dk, const Strided& dv, float scale, bool deterministic,
                         const DeviceLimits& dev, std::uintptr_t stream);
// Whether the tensor-core kernels of the call fit the device's shared memory.
template <typename T>
bool flash_fits_cuda(int64_t d, const DeviceLimits& dev, bool backward, bool deterministic);

// Exact float32 (FP32 FMA). `delta`: B*H*Nq floats of workspace.
void attention_forward_exact(const AttentionShape& s, Strided q, Strided k, Strided v, Strided out, Strided lse,
                             float scale, const DeviceLimits& dev, std::uintptr_t stream);
void attention_backward_exact(const AttentionShape& s, Strided dout, Strided q, Strided k, Strided v, Strided out,
                              Strided lse, float* delta, Strided dq, Strided dk, Strided dv, float scale,
                              const DeviceLimits& dev, std::uintptr_t stream);

}  // namespace armfast::cuda
