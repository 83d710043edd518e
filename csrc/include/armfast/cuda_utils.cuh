// Host-side CUDA helpers of armfast._C_cuda (device-side ones: device_math.cuh): error checks
// that throw (pybind11 turns std::runtime_error into RuntimeError), a guard that makes a device
// current for the duration of a call, and per-device limits (shared memory, SM count) and opt-ins.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "armfast/device_math.cuh"

namespace armfast::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Throws when a CUDA runtime call failed, naming the call.
inline void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error("armfast CUDA: " + what + " failed: " + cudaGetErrorString(err));
  }
}

// Call right after a kernel launch: a bad configuration (too much shared memory, an invalid
// grid, a missing cubin for this GPU) is reported here, with the kernel's name.
inline void check_launch(const std::string& kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error("armfast CUDA: launch of " + kernel + " failed: " + cudaGetErrorString(err));
}

// Makes `device` current for this thread and restores the previous device on exit, so that torch's
// notion of the current device is left untouched.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
    current_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != current_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0, current_ = 0;
};

// Shared memory one block may opt into on `device` (cudaDevAttrMaxSharedMemoryPerBlockOptin:
// 163 KiB on sm_80/sm_87, 227 KiB on sm_90/sm_100, 99 KiB on sm_86/sm_89/sm_120), queried once
// per device.
inline size_t max_shared_memory_per_block(int device) {
  static std::mutex mutex;
  static std::map<int, size_t> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int bytes = 0;
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin, device " + std::to_string(device) + ")");
  return cache.emplace(device, static_cast<size_t>(bytes)).first->second;
}

// Streaming multiprocessors of `device`, queried once per device.
inline int multiprocessor_count(int device) {
  static std::mutex mutex;
  static std::map<int, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(MultiProcessorCount, device " + std::to_string(device) + ")");
  return cache.emplace(device, count).first->second;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory on `device`, which must be current.
// Above the default 48 KiB a kernel has to opt in; the setting belongs to the device's context,
// so the runtime is asked once per (kernel, device), not on every launch.
inline void allow_dynamic_shared_memory(const void* kernel, int device, size_t bytes,
                                        const std::string& name) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& done = granted[{kernel, device}];
  if (done >= bytes) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
             "cudaFuncSetAttribute(" + name + ", " + std::to_string(bytes) + " bytes of shared memory)");
  done = bytes;
}

}  // namespace armfast::cuda
