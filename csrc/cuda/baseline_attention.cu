// armfast::cuda::self_correlation_forward / masked_affinity_forward: the kernels of
// baseline_fwd.cuh launched on the GPU, per dtype (float32 runs on TF32 tensor cores only).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "baseline_fwd.cuh"
#include "cuda_launcher.cuh"
#include "kernels.h"

namespace armfast::cuda {

void self_correlation_forward(DType dtype, const SelfCorrelationShape& s, Strided x, Strided x2, Strided v,
                              Strided out, float scale, const GridBias* bias, bool allow_tf32, int device,
                              std::uintptr_t stream) {
  DeviceGuard guard(device);
  const DeviceLimits dev = device_limits(device);
  const CudaLauncher launch{dev, reinterpret_cast<cudaStream_t>(stream)};
  with_tensor_core_dtype(dtype, allow_tf32, "self-correlation", [&](auto tag) {
    baseline::self_correlation<decltype(tag)>(s, x, x2, v, out, scale, bias, dev, launch);
  });
}

void masked_affinity_forward(DType dtype, const AffinityShape& s, Strided f, const float* rnorm, const float* thresh,
                             Strided v, Strided out, float gamma, float* workspace, int64_t workspace_size,
                             bool allow_tf32, int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  const DeviceLimits dev = device_limits(device);
  const CudaLauncher launch{dev, reinterpret_cast<cudaStream_t>(stream)};
  with_tensor_core_dtype(dtype, allow_tf32, "masked affinity attention", [&](auto tag) {
    baseline::masked_affinity<decltype(tag)>(s, f, rnorm, thresh, v, out, gamma, workspace, workspace_size, dev,
                                             launch);
  });
}

int64_t masked_affinity_workspace(const AffinityShape& s, int device) {
  DeviceGuard guard(device);
  return baseline::masked_affinity_workspace(s, device_limits(device));
}

}  // namespace armfast::cuda
