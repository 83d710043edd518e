// The Launcher that starts a kernel on the GPU (flash_dispatch.h and baseline_fwd.cuh name the
// interface; the tests' emulator has its own): one launch with its dynamic shared memory opted
// into, on the call's stream, checked. Also the dtype switch of the forward-only kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "armfast/cuda_utils.cuh"
#include "attention_entry.h"

namespace armfast::cuda {

struct CudaLauncher {
  const DeviceLimits& dev;
  cudaStream_t stream;

  template <typename Kernel, class Params>
  void operator()(Kernel kernel, const std::string& name, int64_t blocks, int threads, size_t smem,
                  const Params& p) const {
    if (blocks == 0) return;  // an empty batch or sequence: nothing to write
    if (blocks > 0x7fffffffLL) throw std::invalid_argument(name + ": too many blocks (" + std::to_string(blocks) + ")");
    allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), dev.index, smem, name);
    kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
    check_launch(name);
  }
};

// Calls f(T{}) for the call's element type of the forward-only kernels (baseline_attention.cu,
// similarity_attention.cu); float32 only on TF32 tensor cores.
template <typename F>
void with_tensor_core_dtype(DType dtype, bool allow_tf32, const char* op, F&& f) {
  switch (dtype) {
    case DType::float16: f(__half{}); break;
    case DType::bfloat16: f(__nv_bfloat16{}); break;
    case DType::float32:
      if (!allow_tf32)
        throw std::invalid_argument(std::string("armfast CUDA ") + op +
                                    " runs float32 on TF32 tensor cores only, which torch's matmul precision "
                                    "'highest' forbids; use float16/bfloat16, backend='triton' or 'sdpa'");
      f(float{});
      break;
  }
}

}  // namespace armfast::cuda
