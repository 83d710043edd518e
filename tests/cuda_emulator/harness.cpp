// C entry points of the emulated CUDA kernels for tests/test_cuda_emulated.py (loaded with
// ctypes). The attention entries run exactly the host code of armfast._C_cuda
// (csrc/cuda/flash_dispatch.h: tile choice, parameters, launch sequence) with a launcher that
// runs each kernel in the emulator instead of on a GPU.
#include "emulator.h"

#include <cstdint>
#include <cstring>
#include <string>

#include "flash_dispatch.h"

namespace flash = armfast::cuda::flash;
using armfast::cuda::AttentionShape;
using armfast::cuda::Strided;

namespace {

std::string g_error;  // returned to Python; empty on success

struct EmuLauncher {
  const armfast::cuda::DeviceLimits& dev;
  std::string log;  // "name blocks threads smem;" per launch, for the tests to inspect
  template <class Kernel>
  void operator()(Kernel kernel, const std::string& name, int64_t blocks, int threads, size_t smem,
                  const flash::AttnParams& p) {
    if (!g_error.empty() || blocks == 0) return;
    if (smem > dev.smem) {
      g_error = name + ": launched with " + std::to_string(smem) + " bytes of shared memory, more than the " +
                std::to_string(dev.smem) + " the device allows";
      return;
    }
    log += name + " " + std::to_string(blocks) + " " + std::to_string(threads) + " " + std::to_string(smem) + ";";
    const std::string e = armfast::emu::launch({static_cast<unsigned>(blocks)}, {static_cast<unsigned>(threads)},
                                               smem, [&] { kernel(p); });
    if (!e.empty()) g_error = name + ": " + e;
  }
};

Strided strided(void* data, const int64_t* strides, int n) {
  Strided s{data, {0, 0, 0, 0}};
  for (int i = 0; i < n; ++i) s.stride[i] = strides[i];
  return s;
}

template <typename F>
const char* guarded(F&& f) {
  g_error.clear();
  try {
    f();
  } catch (const std::exception& e) {
    g_error = std::string("exception: ") + e.what();
  }
  return g_error.c_str();
}

template <typename F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(__half{}); break;
    case 1: f(__nv_bfloat16{}); break;
    default: f(float{}); break;
  }
}

std::string g_log;

}  // namespace

extern "C" {

void emu_register_global(const void* begin, int64_t bytes) { armfast::emu::register_global(begin, bytes); }
void emu_clear_globals() { armfast::emu::clear_globals(); }
void emu_set_reverse_schedule(int reverse) { armfast::emu::set_reverse_schedule(reverse != 0); }
const char* emu_launch_log() { return g_log.c_str(); }

// shape = {B, H, Nq, Nk, d}; strides in elements, 4 per tensor (3 for lse).
const char* emu_attention_forward(int dtype, const int64_t* shape, void* q, const int64_t* sq, void* k,
                                  const int64_t* sk, void* v, const int64_t* sv, void* out, const int64_t* so,
                                  void* lse, const int64_t* sl, float scale, int64_t smem, int sms) {
  return guarded([&] {
    const AttentionShape s{shape[0], shape[1], shape[2], shape[3], shape[4]};
    const armfast::cuda::DeviceLimits dev{0, static_cast<size_t>(smem), false, sms};
    EmuLauncher launch{dev, {}};
    with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      flash::flash_forward<T>(s, strided(q, sq, 4), strided(k, sk, 4), strided(v, sv, 4), strided(out, so, 4),
                              strided(lse, sl, 3), scale, dev, launch);
    });
    g_log = launch.log;
  });
}

int64_t emu_attention_backward_workspace(const int64_t* shape, int deterministic) {
  const AttentionShape s{shape[0], shape[1], shape[2], shape[3], shape[4]};
  return armfast::cuda::backward_workspace_size(s, deterministic == 0);
}

const char* emu_attention_backward(int dtype, const int64_t* shape, void* dout, const int64_t* sdo, void* q,
                                   const int64_t* sq, void* k, const int64_t* sk, void* v, const int64_t* sv,
                                   void* out, const int64_t* so, void* lse, const int64_t* sl, float* workspace,
                                   void* dq, const int64_t* sdq, void* dk, const int64_t* sdk, void* dv,
                                   const int64_t* sdv, float scale, int deterministic, int64_t smem, int sms) {
  return guarded([&] {
    const AttentionShape s{shape[0], shape[1], shape[2], shape[3], shape[4]};
    const armfast::cuda::DeviceLimits dev{0, static_cast<size_t>(smem), false, sms};
    EmuLauncher launch{dev, {}};
    with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      flash::flash_backward<T>(s, strided(dout, sdo, 4), strided(q, sq, 4), strided(k, sk, 4), strided(v, sv, 4),
                               strided(out, so, 4), strided(lse, sl, 3), workspace, strided(dq, sdq, 4),
                               strided(dk, sdk, 4), strided(dv, sdv, 4), scale, deterministic != 0, dev, launch);
    });
    g_log = launch.log;
  });
}

}  // extern "C"
