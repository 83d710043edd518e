// CUDA runtime queries used by the Python layer to tell whether the cuda backend can run.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels.h"

namespace armfast::cuda {

int cuda_device_count() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls see a clean state
    throw std::runtime_error(std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err));
  }
  return count;
}

}  // namespace armfast::cuda
