// armfast::cuda::attention_forward / attention_backward: per call, the device's limits (with the
// ARMFAST_CUDA_MAX_SHARED_MEMORY cap) and the kernels that run: the tensor-core flash kernels for
// float16 and bfloat16, and for float32 when the caller allows TF32 and they fit; otherwise the
// exact float32 kernels.
#include <cuda_runtime.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "armfast/cuda_utils.cuh"
#include "attention_entry.h"
#include "kernels.h"

namespace armfast::cuda {

DeviceLimits device_limits(int index) {
  DeviceLimits dev{index, max_shared_memory_per_block(index), false, multiprocessor_count(index)};
  // Read on every call (a getenv is cheap next to a launch) so that it can be changed at run time.
  const char* env = std::getenv(kSmemEnv);
  if (env != nullptr && *env != '\0') {
    const std::string text(env);
    if (text.size() > 12 || !std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isdigit(c); }))
      throw std::invalid_argument(std::string(kSmemEnv) + " must be a number of bytes, got '" + text + "'");
    const size_t cap = std::stoull(text);
    if (cap < dev.smem) {
      dev.smem = cap;
      dev.capped = true;
    }
  }
  return dev;
}

int64_t attention_backward_workspace(const AttentionShape& s, bool atomic_dq) {
  return backward_workspace_size(s, atomic_dq);
}

void attention_forward(DType dtype, const AttentionShape& s, Strided q, Strided k, Strided v, Strided out,
                       Strided lse, float scale, bool allow_tf32, int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  const DeviceLimits dev = device_limits(device);
  switch (dtype) {
    case DType::float16: flash_forward_cuda<__half>(s, q, k, v, out, lse, scale, dev, stream); break;
    case DType::bfloat16: flash_forward_cuda<__nv_bfloat16>(s, q, k, v, out, lse, scale, dev, stream); break;
    case DType::float32:
      if (allow_tf32 && flash_fits_cuda<float>(s.d, dev, false, false)) {
        flash_forward_cuda<float>(s, q, k, v, out, lse, scale, dev, stream);
      } else {
        attention_forward_exact(s, q, k, v, out, lse, scale, dev, stream);
      }
      break;
  }
}

void attention_backward(DType dtype, const AttentionShape& s, Strided dout, Strided q, Strided k, Strided v,
                        Strided out, Strided lse, float* workspace, int64_t workspace_size, Strided dq, Strided dk,
                        Strided dv, float scale, bool allow_tf32, bool deterministic, int device,
                        std::uintptr_t stream) {
  DeviceGuard guard(device);
  const DeviceLimits dev = device_limits(device);
  const bool exact = dtype == DType::float32 && !(allow_tf32 && flash_fits_cuda<float>(s.d, dev, true, deterministic));
  if (workspace_size < attention_backward_workspace(s, !exact && !deterministic))
    throw std::invalid_argument("armfast CUDA attention backward: workspace too small");
  switch (dtype) {
    case DType::float16:
      flash_backward_cuda<__half>(s, dout, q, k, v, out, lse, workspace, dq, dk, dv, scale, deterministic, dev, stream);
      break;
    case DType::bfloat16:
      flash_backward_cuda<__nv_bfloat16>(s, dout, q, k, v, out, lse, workspace, dq, dk, dv, scale, deterministic, dev,
                                         stream);
      break;
    case DType::float32:
      if (exact) {
        attention_backward_exact(s, dout, q, k, v, out, lse, workspace, dq, dk, dv, scale, dev, stream);
      } else {
        flash_backward_cuda<float>(s, dout, q, k, v, out, lse, workspace, dq, dk, dv, scale, deterministic, dev, stream);
      }
      break;
  }
}

}  // namespace armfast::cuda
