// C entry points of the emulated CUDA kernels for tests/ops/test_cuda_emulated.py (loaded with
// ctypes). The attention entries run exactly the host code of armfast._C_cuda
// (csrc/cuda/flash_dispatch.h: tile choice, parameters, launch sequence) with a launcher that
// runs each kernel in the emulator instead of on a GPU.
#include "emulator.h"

#include <cstdint>
#include <cstring>
#include <string>

#include "baseline_fwd.cuh"
#include "flash_dispatch.h"
#include "logits_gemm.cuh"
#include "similarity_fwd.cuh"

namespace flash = armfast::cuda::flash;
using armfast::cuda::AttentionShape;
using armfast::cuda::Strided;

namespace {

std::string g_error;  // returned to Python; empty on success

struct EmuLauncher {
  const armfast::cuda::DeviceLimits& dev;
  std::string log;  // "name blocks threads smem;" per launch, for the tests to inspect
  template <class Kernel, class Params>
  void operator()(Kernel kernel, const std::string& name, int64_t blocks, int threads, size_t smem,
                  const Params& p) {
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

// One warp multiplies 16 x 16 blocks through Mma<T>: C = A B with A stored [m][k] (load_a) or
// [k][m] (load_a_trans) and B stored [n][k] (load_b) or [k][n] (load_b_trans); with `chain`,
// C = round_T(A B) B2 with the intermediate fed from the accumulators (a_from_acc).
template <typename T>
void warp_product_kernel(const float* A, const float* B, const float* B2, float* C, bool a_trans, bool b_trans,
                         bool chain) {
  using armfast::cuda::Mma;
  using armfast::cuda::from_float;
  using armfast::cuda::mma_sync;
  namespace mma = armfast::mma;
  constexpr int N = 16, LD = N + 8;
  ARMFAST_DYNAMIC_SMEM(smem);
  T* as = reinterpret_cast<T*>(smem);
  T* bs = as + N * LD;
  T* b2s = bs + N * LD;
  const int lane = threadIdx.x;
  for (int i = lane; i < N * N; i += 32) {
    const int r = i / N, c = i % N;  // A(r, c), B(r, c) = B[k = r][n = c]
    as[(a_trans ? c * LD + r : r * LD + c)] = from_float<T>(A[i]);
    bs[(b_trans ? r * LD + c : c * LD + r)] = from_float<T>(B[i]);
    b2s[r * LD + c] = from_float<T>(B2[i]);  // [k][n]
  }
  __syncthreads();
  float acc[2][4] = {};
  for (int ks = 0; ks < N / Mma<T>::K; ++ks) {
    uint32_t a[4], b[2][2];
    if (a_trans) Mma<T>::load_a_trans(a, as + ks * Mma<T>::K * LD, LD);
    else Mma<T>::load_a(a, as + ks * Mma<T>::K, LD);
    if (b_trans) Mma<T>::load_b_trans(b, bs + ks * Mma<T>::K * LD, LD);
    else Mma<T>::load_b(b, bs + ks * Mma<T>::K, LD);
    mma_sync<T>(acc[0], a, b[0]);
    mma_sync<T>(acc[1], a, b[1]);
  }
  if (chain) {
    float out[2][4] = {};
    for (int ks = 0; ks < N / Mma<T>::K; ++ks) {
      uint32_t a[4], b[2][2];
      Mma<T>::a_from_acc(a, acc, ks);
      Mma<T>::load_b_trans(b, b2s + ks * Mma<T>::K * LD, LD);
      mma_sync<T>(out[0], a, b[0]);
      mma_sync<T>(out[1], a, b[1]);
    }
    std::memcpy(acc, out, sizeof acc);
  }
  for (int j = 0; j < 2; ++j)
    for (int e = 0; e < 4; ++e) C[mma::c_row(lane, e) * N + 8 * j + mma::c_col(lane, e)] = acc[j][e];
}

}  // namespace

extern "C" {

void emu_register_global(const void* begin, int64_t bytes) { armfast::emu::register_global(begin, bytes); }
void emu_clear_globals() { armfast::emu::clear_globals(); }
void emu_set_reverse_schedule(int reverse) { armfast::emu::set_reverse_schedule(reverse != 0); }
const char* emu_launch_log() { return g_log.c_str(); }

// A, B, B2, C: 16 x 16 row-major float32.
const char* emu_warp_product(int dtype, const float* A, const float* B, const float* B2, float* C, int a_trans,
                             int b_trans, int chain) {
  return guarded([&] {
    with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      const std::string e = armfast::emu::launch({1}, {32}, 3 * 16 * 24 * sizeof(T), [&] {
        warp_product_kernel<T>(A, B, B2, C, a_trans != 0, b_trans != 0, chain != 0);
      });
      if (!e.empty()) g_error = e;
    });
  });
}

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

// out(m, n) = epilogue(sum_k A(m, k) B(k, n) kscale[k]) through gemm_tc_kernel (a_mk / b_nk pick
// the staging, as patch_text_logits' three GEMMs do) over `splits` K-splits, then
// splitk_reduce_kernel: A(m, k) = a[a_row(m) + k * a_col], a_row(m) = (m / a_n) * a_outer +
// (m % a_n) * a_inner (a_n = 0: m * a_inner); B(k, n) = b[k * b_k + n * b_n]; out fp32 row-major.
const char* emu_logits_gemm(int dtype, int a_mk, int b_nk, int64_t M, int64_t N, int64_t K, const void* a,
                            int64_t a_n, int64_t a_outer, int64_t a_inner, int64_t a_col, const void* b, int64_t b_k,
                            int64_t b_n, const float* kscale, const float* mscale, const float* nscale,
                            const float* sscale, float* out, int splits, float* partial) {
  return guarded([&] {
    with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      namespace lg = armfast::cuda::logits;
      lg::GemmArgs<T, float> g{};
      g.a = static_cast<const T*>(a), g.a_row = lg::Index{a_n, a_outer, a_inner}, g.a_col = lg::plain(a_col);
      g.b = static_cast<const T*>(b), g.b_row = lg::plain(b_k), g.b_col = lg::plain(b_n);
      g.kscale = kscale, g.mscale = mscale, g.nscale = nscale, g.sscale = sscale;
      g.out = out, g.o_row = lg::plain(N), g.o_col = 1;
      g.M = M, g.N = N, g.K = K, g.partial = partial;
      g.k_split = lg::k_per_split(K, splits);
      const unsigned nsplit = static_cast<unsigned>((K + g.k_split - 1) / g.k_split);
      const armfast::emu::Dim3 grid{static_cast<unsigned>((M + 63) / 64), static_cast<unsigned>((N + 63) / 64), nsplit};
      auto run = [&](auto a_tag, auto b_tag) {
        constexpr bool AMK = decltype(a_tag)::value, BNK = decltype(b_tag)::value;
        lg::set_vector_loads<AMK, BNK>(g);
        g_log = std::string("vec_a=") + (g.vec_a ? "1" : "0") + " vec_b=" + (g.vec_b ? "1" : "0") + ";";
        std::string e = armfast::emu::launch(grid, {128}, lg::TcGemm<T, AMK, BNK>::SMEM,
                                             [&] { lg::gemm_tc_kernel<T, float, AMK, BNK>(g); });
        if (e.empty() && nsplit > 1) {
          e = armfast::emu::launch({static_cast<unsigned>((M * N + 255) / 256)}, {256}, 0,
                                   [&] { lg::splitk_reduce_kernel<T, float>(g, static_cast<int>(nsplit)); });
        }
        if (!e.empty()) g_error = e;
      };
      using F = std::false_type;
      using Tr = std::true_type;
      if (a_mk && b_nk) run(Tr{}, Tr{});
      else if (a_mk) run(Tr{}, F{});
      else if (b_nk) run(F{}, Tr{});
      else run(F{}, F{});
    });
  });
}

// The baseline attentions (baseline_fwd.cuh) through the same host code as armfast._C_cuda.
// shape = {B, H, N, d}; x2 null: one operand; grid_h = 0: no Gaussian bias.
const char* emu_self_correlation_forward(int dtype, const int64_t* shape, void* x, const int64_t* sx, void* x2,
                                         const int64_t* sx2, void* v, const int64_t* sv, void* out,
                                         const int64_t* so, float scale, int64_t grid_h, int64_t grid_w,
                                         int class_token, double sigma, int64_t smem, int sms) {
  return guarded([&] {
    const armfast::cuda::SelfCorrelationShape s{shape[0], shape[1], shape[2], shape[3]};
    const armfast::cuda::GridBias bias{grid_h, grid_w, class_token != 0, sigma};
    const armfast::cuda::DeviceLimits dev{0, static_cast<size_t>(smem), false, sms};
    EmuLauncher launch{dev, {}};
    with_dtype(dtype, [&](auto tag) {
      armfast::cuda::baseline::self_correlation<decltype(tag)>(
          s, strided(x, sx, 4), x2 ? strided(x2, sx2, 4) : Strided{nullptr, {0, 0, 0, 0}}, strided(v, sv, 4),
          strided(out, so, 4), scale, grid_h > 0 ? &bias : nullptr, dev, launch);
    });
    g_log = launch.log;
  });
}

// float32 elements of the workspace emu_masked_affinity_forward needs; shape = {B, n, C, H, d}.
int64_t emu_masked_affinity_workspace(const int64_t* shape, int64_t smem, int sms) {
  const armfast::cuda::AffinityShape s{shape[0], shape[1], shape[2], shape[3], shape[4]};
  return armfast::cuda::baseline::masked_affinity_workspace(s, {0, static_cast<size_t>(smem), false, sms});
}

// shape = {B, n, C, H, d}; rnorm [B, n], thresh [B] float32 contiguous; workspace: the floats above.
const char* emu_masked_affinity_forward(int dtype, const int64_t* shape, void* f, const int64_t* sf,
                                        const float* rnorm, const float* thresh, void* v, const int64_t* sv,
                                        void* out, const int64_t* so, float gamma, float* workspace,
                                        int64_t workspace_size, int64_t smem, int sms) {
  return guarded([&] {
    const armfast::cuda::AffinityShape s{shape[0], shape[1], shape[2], shape[3], shape[4]};
    const armfast::cuda::DeviceLimits dev{0, static_cast<size_t>(smem), false, sms};
    EmuLauncher launch{dev, {}};
    with_dtype(dtype, [&](auto tag) {
      armfast::cuda::baseline::masked_affinity<decltype(tag)>(s, strided(f, sf, 3), rnorm, thresh,
                                                              strided(v, sv, 4), strided(out, so, 4), gamma,
                                                              workspace, workspace_size, dev, launch);
    });
    g_log = launch.log;
  });
}

// SC-CLIP's similarity ops (similarity_fwd.cuh) through the same host code as armfast._C_cuda.
// shape = {B, N, C, D}; rnorm [B, N] float32 contiguous; rowsum [B, N] float32, written.
const char* emu_similarity_aggregation_forward(int dtype, const int64_t* shape, void* f, const int64_t* sf,
                                               const float* rnorm, void* x, const int64_t* sx, void* out,
                                               const int64_t* so, float* rowsum, float threshold, int64_t smem,
                                               int sms) {
  return guarded([&] {
    const armfast::cuda::AggregationShape s{shape[0], shape[1], shape[2], shape[3]};
    const armfast::cuda::DeviceLimits dev{0, static_cast<size_t>(smem), false, sms};
    EmuLauncher launch{dev, {}};
    with_dtype(dtype, [&](auto tag) {
      armfast::cuda::similarity::similarity_aggregation<decltype(tag)>(
          s, strided(f, sf, 3), rnorm, strided(x, sx, 3), strided(out, so, 3), rowsum, threshold, dev, launch);
    });
    g_log = launch.log;
  });
}

// shape = {B, N, C, H, d}; rnorm [B, N], thresh [B] float32 contiguous; lse_mask, lse_kk [B, H, N]
// float32, written.
const char* emu_averaged_dual_softmax_forward(int dtype, const int64_t* shape, void* f, const int64_t* sf,
                                              const float* rnorm, const float* thresh, void* k, const int64_t* sk,
                                              void* v, const int64_t* sv, void* out, const int64_t* so,
                                              float* lse_mask, float* lse_kk, float scale, float gamma,
                                              int64_t smem, int sms) {
  return guarded([&] {
    const armfast::cuda::DualSoftmaxShape s{shape[0], shape[1], shape[2], shape[3], shape[4]};
    const armfast::cuda::DeviceLimits dev{0, static_cast<size_t>(smem), false, sms};
    EmuLauncher launch{dev, {}};
    with_dtype(dtype, [&](auto tag) {
      armfast::cuda::similarity::averaged_dual_softmax<decltype(tag)>(
          s, strided(f, sf, 3), rnorm, thresh, strided(k, sk, 4), strided(v, sv, 4), strided(out, so, 4), lse_mask,
          lse_kk, scale, gamma, dev, launch);
    });
    g_log = launch.log;
  });
}

}  // extern "C"
