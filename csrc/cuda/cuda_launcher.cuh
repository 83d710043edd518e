// The Launcher that starts a kernel on the GPU (flash_dispatch.h and baseline_fwd.cuh name the
// interface; the tests' emulator has its own): one launch with its dynamic shared memory opted
// into, on the call's stream, checked.
#pragma once

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

}  // namespace armfast::cuda
