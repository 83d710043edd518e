// Host side of the tensor-core flash attention: the tile shapes per dtype and head dim, which of
// them a call uses on a given GPU, and the launch sequence of the forward and the backward.
//
// Free of the CUDA runtime: kernels are started through a `Launcher`, called as
//   launch(kernel, name, blocks, threads, shared_memory_bytes, params)
// (attention_tc.cuh launches on the GPU; the tests' emulator runs the same sequence on the host).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "flash_bwd.cuh"
#include "flash_fwd.cuh"
#include "attention_entry.h"

namespace armfast::cuda::flash {

template <typename T>
const char* dtype_name() {
  if constexpr (std::is_same_v<T, __half>) return "float16";
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bfloat16";
  else return "float32 (tf32)";
}

// ---- tile shapes ----------------------------------------------------------------------------------
// Forward: 128 query rows per block (4 warps x 2 m16 tiles for d <= 64, 8 warps x 1 for d = 128:
// Q, S, P and O of 16 rows at d = 128 already take ~130 registers), or 64 rows when 128-row tiles
// would leave SMs idle (B*H*ceil(Nq/128) < SMs, e.g. ViT-B/16 at batch 1) or do not fit.
// Key tiles of 64. Backward: key blocks of 64 (4 warps x 16 keys), query tiles of 64 (32 at
// d = 128, where dK and dV alone hold 128 registers per thread).
// Shared memory, float16/bfloat16: forward 128 rows d=64 36 KiB, d=128 68 KiB; dK/dV d=64 66 KiB,
// d=128 78 KiB; deterministic dQ d=64 54 KiB, d=128 68 KiB: every GPU from sm_80 on (99 KiB and
// more per block) runs all of them.
// TF32 (float32 when torch allows TF32) has one shape per kernel, sized for 4-byte elements.
template <typename T, int D>
struct Tiles {
  static constexpr bool kTf32 = std::is_same_v<T, float>;
  using FwdLarge = std::conditional_t<kTf32, FwdConfig<T, D, 4, 1, D == 128 ? 32 : 64>,
                                      FwdConfig<T, D, D == 128 ? 8 : 4, D == 128 ? 1 : 2, 64>>;
  using FwdSmall = std::conditional_t<kTf32, FwdLarge, FwdConfig<T, D, 4, 1, 64>>;
  template <bool ATOMIC_DQ>
  using BwdKV = BwdKVConfig<T, D, 4, kTf32 ? (D == 32 ? 64 : D == 64 ? 32 : 16) : (D == 128 ? 32 : 64), ATOMIC_DQ>;
  using BwdQ = BwdQConfig<T, D, 4, (kTf32 || D == 128) ? 32 : 64>;
};

template <class C>
std::string config_name(const char* kernel) {
  using T = typename C::Elem;
  return std::string(kernel) + "<" + dtype_name<T>() + ", d=" + std::to_string(C::D) + ", " +
         std::to_string(C::THREADS / 32) + " warps>";
}

inline int64_t blocks_for(int64_t BH, int n, int tile) { return BH * ((n + tile - 1) / tile); }

// Whether the tensor-core kernels of this (dtype, head dim) run on `dev`; float32 callers fall back
// to the exact kernels when the TF32 ones do not fit.
template <typename T, int D>
bool forward_fits(const DeviceLimits& dev) {
  using Tl = Tiles<T, D>;
  return Tl::FwdSmall::SMEM <= dev.smem || Tl::FwdLarge::SMEM <= dev.smem;
}
template <typename T, int D>
bool backward_fits(const DeviceLimits& dev, bool deterministic) {
  using Tl = Tiles<T, D>;
  return deterministic ? Tl::template BwdKV<false>::SMEM <= dev.smem && Tl::BwdQ::SMEM <= dev.smem
                       : Tl::template BwdKV<true>::SMEM <= dev.smem;
}

// ---- forward ------------------------------------------------------------------------------------
template <typename T, int D, class Launcher>
void forward(AttnParams p, const DeviceLimits& dev, Launcher&& launch) {
  using Large = typename Tiles<T, D>::FwdLarge;
  using Small = typename Tiles<T, D>::FwdSmall;
  auto run = [&](auto config) {
    using C = decltype(config);
    p.n_tiles = ceil_div_int(p.Nq, C::BQ);
    launch(flash_fwd_kernel<C>, config_name<C>("flash_fwd_kernel"), p.BH * p.n_tiles, C::THREADS, C::SMEM, p);
  };
  const bool large_fits = Large::SMEM <= dev.smem, small_fits = Small::SMEM <= dev.smem;
  if (!large_fits && !small_fits) too_little_smem("forward", dtype_name<T>(), D, Small::SMEM, dev);
  // Large tiles when they fill the GPU (or are all that fits); small ones put more blocks on it.
  if (large_fits && (!small_fits || blocks_for(p.BH, p.Nq, Large::BQ) >= dev.sms)) {
    run(Large{});
  } else {
    run(Small{});
  }
}

// ---- backward -----------------------------------------------------------------------------------
// p.dq_accum: fp32 [B*H*Nq, D] workspace for the atomic dQ (ignored when deterministic).
template <typename T, int D, class Launcher>
void backward(AttnParams p, bool deterministic, const DeviceLimits& dev, Launcher&& launch) {
  using Tl = Tiles<T, D>;
  using KVAtomic = typename Tl::template BwdKV<true>;
  using KVOnly = typename Tl::template BwdKV<false>;
  using Q = typename Tl::BwdQ;
  // Every kernel of the call is checked before the first launch, so a call fails before it writes.
  if (deterministic) {
    if (KVOnly::SMEM > dev.smem) too_little_smem("backward dK/dV", dtype_name<T>(), D, KVOnly::SMEM, dev);
    if (Q::SMEM > dev.smem) too_little_smem("backward dQ", dtype_name<T>(), D, Q::SMEM, dev);
    p.dq_accum = nullptr;
  } else if (KVAtomic::SMEM > dev.smem) {
    too_little_smem("backward dK/dV/dQ", dtype_name<T>(), D, KVAtomic::SMEM, dev);
  }
  const std::string dt = std::string("<") + dtype_name<T>() + ", d=" + std::to_string(D) + ">";
  const int64_t row_blocks = (p.BH * p.Nq + kRowWarps - 1) / kRowWarps;
  launch(flash_bwd_preprocess_kernel<T, D>, "flash_bwd_preprocess_kernel" + dt, row_blocks, kRowThreads, 0, p);
  if (deterministic) {
    p.n_tiles = ceil_div_int(p.Nk, KVOnly::BK);
    launch(flash_bwd_dkdv_kernel<KVOnly>, config_name<KVOnly>("flash_bwd_dkdv_kernel"), p.BH * p.n_tiles,
           KVOnly::THREADS, KVOnly::SMEM, p);
    p.n_tiles = ceil_div_int(p.Nq, Q::BQ);
    launch(flash_bwd_dq_kernel<Q>, config_name<Q>("flash_bwd_dq_kernel"), p.BH * p.n_tiles, Q::THREADS, Q::SMEM, p);
  } else {
    p.n_tiles = ceil_div_int(p.Nk, KVAtomic::BK);
    launch(flash_bwd_dkdv_kernel<KVAtomic>, config_name<KVAtomic>("flash_bwd_dkdv_kernel"), p.BH * p.n_tiles,
           KVAtomic::THREADS, KVAtomic::SMEM, p);
    launch(flash_bwd_convert_dq_kernel<T, D>, "flash_bwd_convert_dq_kernel" + dt, row_blocks, kRowThreads, 0, p);
  }
}

// ---- entry points (per dtype; the head dim is dispatched here) -----------------------------------
inline AttnParams base_params(const AttentionShape& s, float scale) {
  if (s.Nq > 0x7fffffff || s.Nk > 0x7fffffff || s.H > 0x7fffffff)
    throw std::invalid_argument("armfast CUDA attention: sequence length or head count too large");
  AttnParams p{};
  p.BH = s.B * s.H;
  p.H = static_cast<int>(s.H), p.Nq = static_cast<int>(s.Nq), p.Nk = static_cast<int>(s.Nk);
  p.scale = scale;
  p.scale_log2 = scale * kLog2e;
  return p;
}

template <typename T>
bool flash_fits(int64_t d, const DeviceLimits& dev, bool backward, bool deterministic) {
  bool ok = false;
  with_head_dim(d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    ok = backward ? backward_fits<T, D>(dev, deterministic) : forward_fits<T, D>(dev);
  });
  return ok;
}

template <typename T, class Launcher>
void flash_forward(const AttentionShape& s, const Strided& q, const Strided& k, const Strided& v, const Strided& out,
                   const Strided& lse, float scale, const DeviceLimits& dev, Launcher&& launch) {
  AttnParams p = base_params(s, scale);
  p.q = q.data, p.k = k.data, p.v = v.data, p.out = out.data;
  p.lse = static_cast<float*>(lse.data);
  copy_strides(p.sq, q, 4), copy_strides(p.sk, k, 4), copy_strides(p.sv, v, 4);
  copy_strides(p.so, out, 4), copy_strides(p.sl, lse, 3);
  p.vec_q = vec_ok<T>(q), p.vec_k = vec_ok<T>(k), p.vec_v = vec_ok<T>(v), p.vec_o = vec_ok<T>(out);
  with_head_dim(s.d, [&](auto dim) { forward<T, decltype(dim)::value>(p, dev, launch); });
}

template <typename T, class Launcher>
void flash_backward(const AttentionShape& s, const Strided& dout, const Strided& q, const Strided& k,
                    const Strided& v, const Strided& out, const Strided& lse, float* workspace, const Strided& dq,
                    const Strided& dk, const Strided& dv, float scale, bool deterministic, const DeviceLimits& dev,
                    Launcher&& launch) {
  AttnParams p = base_params(s, scale);
  p.q = q.data, p.k = k.data, p.v = v.data, p.dout = dout.data, p.out_in = out.data;
  p.lse = static_cast<float*>(lse.data);
  p.dq = dq.data, p.dk = dk.data, p.dv = dv.data;
  p.delta = workspace;
  p.dq_accum = deterministic ? nullptr : workspace + dq_accum_offset(p.BH * s.Nq);
  copy_strides(p.sq, q, 4), copy_strides(p.sk, k, 4), copy_strides(p.sv, v, 4);
  copy_strides(p.sdo, dout, 4), copy_strides(p.so, out, 4), copy_strides(p.sl, lse, 3);
  copy_strides(p.sdq, dq, 4), copy_strides(p.sdk, dk, 4), copy_strides(p.sdv, dv, 4);
  p.vec_q = vec_ok<T>(q), p.vec_k = vec_ok<T>(k), p.vec_v = vec_ok<T>(v), p.vec_do = vec_ok<T>(dout);
  p.vec_dq = vec_ok<T>(dq), p.vec_dk = vec_ok<T>(dk), p.vec_dv = vec_ok<T>(dv);
  with_head_dim(s.d, [&](auto dim) { backward<T, decltype(dim)::value>(p, deterministic, dev, launch); });
}

}  // namespace armfast::cuda::flash
