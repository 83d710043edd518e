// armfast::cuda::similarity_aggregation_forward / averaged_dual_softmax_forward: the kernels of
// similarity_fwd.cuh launched on the GPU, per dtype (float32 runs on TF32 tensor cores only, with S
// in 3xTF32).
#include <cuda_runtime.h>

#include "cuda_launcher.cuh"
#include "kernels.h"
#include "similarity_fwd.cuh"

namespace armfast::cuda {

void similarity_aggregation_forward(DType dtype, const AggregationShape& s, Strided f, const float* rnorm,
                                    Strided x, Strided out, float* rowsum, float threshold, bool allow_tf32,
                                    int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  const DeviceLimits dev = device_limits(device);
  const CudaLauncher launch{dev, reinterpret_cast<cudaStream_t>(stream)};
  with_tensor_core_dtype(dtype, allow_tf32, "similarity aggregation", [&](auto tag) {
    similarity::similarity_aggregation<decltype(tag)>(s, f, rnorm, x, out, rowsum, threshold, dev, launch);
  });
}

void averaged_dual_softmax_forward(DType dtype, const DualSoftmaxShape& s, Strided f, const float* rnorm,
                                   const float* thresh, Strided k, Strided v, Strided out, float* lse_mask,
                                   float* lse_kk, float scale, float gamma, bool allow_tf32, int device,
                                   std::uintptr_t stream) {
  DeviceGuard guard(device);
  const DeviceLimits dev = device_limits(device);
  const CudaLauncher launch{dev, reinterpret_cast<cudaStream_t>(stream)};
  with_tensor_core_dtype(dtype, allow_tf32, "averaged dual softmax", [&](auto tag) {
    similarity::averaged_dual_softmax<decltype(tag)>(s, f, rnorm, thresh, k, v, out, lse_mask, lse_kk, scale, gamma,
                                                     dev, launch);
  });
}

}  // namespace armfast::cuda
