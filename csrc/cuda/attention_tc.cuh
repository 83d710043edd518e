// Definitions behind the tensor-core entry points of attention_entry.h: the flash kernels of
// flash_dispatch.h launched on the GPU. Each attention_tc_<dtype>.cu instantiates them for one
// dtype, so nvcc compiles the dtypes in parallel.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "attention_entry.h"
#include "cuda_launcher.cuh"
#include "flash_dispatch.h"

namespace armfast::cuda {

template <typename T>
void flash_forward_cuda(const AttentionShape& s, const Strided& q, const Strided& k, const Strided& v,
                        const Strided& out, const Strided& lse, float scale, const DeviceLimits& dev,
                        std::uintptr_t stream) {
  flash::flash_forward<T>(s, q, k, v, out, lse, scale, dev, CudaLauncher{dev, reinterpret_cast<cudaStream_t>(stream)});
}

template <typename T>
void flash_backward_cuda(const AttentionShape& s, const Strided& dout, const Strided& q, const Strided& k,
                         const Strided& v, const Strided& out, const Strided& lse, float* workspace,
                         const Strided& dq, const Strided& dk, const Strided& dv, float scale, bool deterministic,
                         const DeviceLimits& dev, std::uintptr_t stream) {
  flash::flash_backward<T>(s, dout, q, k, v, out, lse, workspace, dq, dk, dv, scale, deterministic, dev,
                           CudaLauncher{dev, reinterpret_cast<cudaStream_t>(stream)});
}

template <typename T>
bool flash_fits_cuda(int64_t d, const DeviceLimits& dev, bool backward, bool deterministic) {
  return flash::flash_fits<T>(d, dev, backward, deterministic);
}

}  // namespace armfast::cuda

// Explicit instantiation of the three entry points for one dtype.
#define ARMFAST_FLASH_INSTANTIATE(T)                                                                        \
  template void armfast::cuda::flash_forward_cuda<T>(                                                       \
      const AttentionShape&, const Strided&, const Strided&, const Strided&, const Strided&, const Strided&, \
      float, const DeviceLimits&, std::uintptr_t);                                                          \
  template void armfast::cuda::flash_backward_cuda<T>(                                                      \
      const AttentionShape&, const Strided&, const Strided&, const Strided&, const Strided&, const Strided&, \
      const Strided&, float*, const Strided&, const Strided&, const Strided&, float, bool, const DeviceLimits&, \
      std::uintptr_t);                                                                                      \
  template bool armfast::cuda::flash_fits_cuda<T>(int64_t, const DeviceLimits&, bool, bool)
