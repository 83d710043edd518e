// Warp-level building blocks of the tensor-core kernels (sm_80 and newer): mma.sync, ldmatrix,
// cp.async, quad shuffles, and `Mma<T>`, which loads the operand fragments of one warp-wide
// product from shared memory and multiplies them. The kernels are written against `Mma<T>` only,
// so one kernel source serves float16 / bfloat16 (m16n8k16) and float32 on TF32 (m16n8k8).
//
// Every lane/register -> (row, col) map used here is in mma_layout.h, checked on the host against
// the PTX ISA. With ARMFAST_EMULATE (the tests' host build) each instruction calls the emulator in
// tests/cuda_emulator, which implements the PTX semantics independently of these maps.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "armfast/device_math.cuh"
#include "armfast/mma_layout.h"

// The block's dynamic shared memory, as `unsigned char name[]` aligned to 128 bytes.
#if defined(ARMFAST_EMULATE)
#define ARMFAST_DYNAMIC_SMEM(name) unsigned char* name = ::armfast::emu::dynamic_smem()
#else
#define ARMFAST_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace armfast::cuda {

// ---- instructions ----------------------------------------------------------------------------
#if !defined(ARMFAST_EMULATE)
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Four 8x8 b16 matrices; `row` is this lane's row address (see mma_layout.h).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(ARMFAST_EMULATE)
  ::armfast::emu::ldmatrix_x4(r, row, false);
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if defined(ARMFAST_EMULATE)
  ::armfast::emu::ldmatrix_x4(r, row, true);
#elif defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
#endif
}

// D = A B + D, fp32 accumulators; T = __half or __nv_bfloat16 (m16n8k16) or float (tf32 m16n8k8).
template <typename T>
__device__ __forceinline__ void mma_sync(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(ARMFAST_EMULATE)
  ::armfast::emu::mma<T>(d, a, b);
#elif defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, float>, "mma_sync: float16, bfloat16 or float (tf32)");
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// fp32 -> tf32 (round to nearest, ties away), as the bits of a .tf32 operand.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(ARMFAST_EMULATE)
  return ::armfast::emu::cvt_rna_tf32(x);
#elif defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  return 0;
#endif
}

// 16 bytes global -> shared without a register round trip; src_bytes < 16 zero-fills the rest
// (0 for a row past the end: the source is not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if defined(ARMFAST_EMULATE)
  ::armfast::emu::cp_async(dst, src, 16, src_bytes);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(ARMFAST_EMULATE)
  ::armfast::emu::cp_async_commit();
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(ARMFAST_EMULATE)
  ::armfast::emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Reductions over the 4 lanes of a quad (the lanes sharing an accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Two values rounded to T and packed into 32 bits, `lo` at the lower address.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(sizeof(T) == 2, "pack2 packs 16-bit types");
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    __builtin_memcpy(&r, &v, 4);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    __builtin_memcpy(&r, &v, 4);
  }
  return r;
}

// ---- operand fragments -----------------------------------------------------------------------
// Mma<T> multiplies a 16 x K block of A by a K x 16 block of B (two n8 accumulator tiles) per
// k step. Tiles live in shared memory, row-major with leading dimension `ld` (elements), each row
// 16-byte aligned; every pointer below is the tile's element (0, 0) of the 16 x 16 / 16 x 8 block.
//   load_a        A from an [m][k] tile            load_a_trans  A from a [k][m] tile
//   load_b        B (two n8 tiles) from [n][k]      load_b_trans  B (two n8 tiles) from [k][n]
//   a_from_acc    A from accumulators: the fp32 m16 x K block of a previous product's
//                 accumulators (K / 8 n8 tiles), rounded to T (P = softmax(S) feeding P V)
template <typename T>
struct Mma {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "16-bit Mma");
  static constexpr int K = 16;

  __device__ __forceinline__ static void load_a(uint32_t (&a)[4], const T* tile, int ld) {
    const int lane = threadIdx.x % 32;
    ldmatrix_x4(a, tile + mma::ldsm_rows16_row(lane) * ld + mma::ldsm_rows16_col(lane));
  }
  __device__ __forceinline__ static void load_a_trans(uint32_t (&a)[4], const T* tile, int ld) {
    const int lane = threadIdx.x % 32;
    ldmatrix_x4_trans(a, tile + mma::ldsm_cols16_row(lane) * ld + mma::ldsm_cols16_col(lane));
  }
  __device__ __forceinline__ static void load_b(uint32_t (&b)[2][2], const T* tile, int ld) {
    const int lane = threadIdx.x % 32;
    uint32_t r[4];
    ldmatrix_x4(r, tile + mma::ldsm_cols16_row(lane) * ld + mma::ldsm_cols16_col(lane));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
  }
  __device__ __forceinline__ static void load_b_trans(uint32_t (&b)[2][2], const T* tile, int ld) {
    const int lane = threadIdx.x % 32;
    uint32_t r[4];
    ldmatrix_x4_trans(r, tile + mma::ldsm_rows16_row(lane) * ld + mma::ldsm_rows16_col(lane));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
  }
  // acc[j] = accumulators of n8 tile j; k step `ks` covers tiles 2 ks and 2 ks + 1: accumulator
  // (row, 2 quad + e) of tile 2 ks + h is A element (row, 8 h + 2 quad + e), as a16 wants.
  template <int NT>
  __device__ __forceinline__ static void a_from_acc(uint32_t (&a)[4], const float (&acc)[NT][4], int ks) {
    const float* c0 = acc[2 * ks];
    const float* c1 = acc[2 * ks + 1];
    a[0] = pack2<T>(c0[0], c0[1]);
    a[1] = pack2<T>(c0[2], c0[3]);
    a[2] = pack2<T>(c1[0], c1[1]);
    a[3] = pack2<T>(c1[2], c1[3]);
  }
};

// float32 on TF32 tensor cores (m16n8k8), with k relabelled by mma::tf32_k in A and B alike:
// lane (group g, quad t) supplies logical columns 2t (as k = t) and 2t + 1 (as k = t + 4). No
// ldmatrix: 32-bit elements are read with plain shared loads (a 64-bit load where the pair is
// contiguous).
template <>
struct Mma<float> {
  static constexpr int K = 8;

  __device__ __forceinline__ static void load_a(uint32_t (&a)[4], const float* tile, int ld) {
    const int lane = threadIdx.x % 32, g = mma::lane_group(lane), t = mma::lane_quad(lane);
    const float2 lo = *reinterpret_cast<const float2*>(tile + g * ld + 2 * t);
    const float2 hi = *reinterpret_cast<const float2*>(tile + (g + 8) * ld + 2 * t);
    a[0] = to_tf32(lo.x), a[1] = to_tf32(hi.x), a[2] = to_tf32(lo.y), a[3] = to_tf32(hi.y);
  }
  __device__ __forceinline__ static void load_a_trans(uint32_t (&a)[4], const float* tile, int ld) {
    const int lane = threadIdx.x % 32, g = mma::lane_group(lane), t = mma::lane_quad(lane);
    a[0] = to_tf32(tile[2 * t * ld + g]), a[1] = to_tf32(tile[2 * t * ld + g + 8]);
    a[2] = to_tf32(tile[(2 * t + 1) * ld + g]), a[3] = to_tf32(tile[(2 * t + 1) * ld + g + 8]);
  }
  __device__ __forceinline__ static void load_b(uint32_t (&b)[2][2], const float* tile, int ld) {
    const int lane = threadIdx.x % 32, g = mma::lane_group(lane), t = mma::lane_quad(lane);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float2 x = *reinterpret_cast<const float2*>(tile + (8 * j + g) * ld + 2 * t);
      b[j][0] = to_tf32(x.x), b[j][1] = to_tf32(x.y);
    }
  }
  __device__ __forceinline__ static void load_b_trans(uint32_t (&b)[2][2], const float* tile, int ld) {
    const int lane = threadIdx.x % 32, g = mma::lane_group(lane), t = mma::lane_quad(lane);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      b[j][0] = to_tf32(tile[2 * t * ld + 8 * j + g]);
      b[j][1] = to_tf32(tile[(2 * t + 1) * ld + 8 * j + g]);
    }
  }
  // One n8 accumulator tile per k step: (g, 2t) -> a0, (g + 8, 2t) -> a1, (g, 2t + 1) -> a2,
  // (g + 8, 2t + 1) -> a3.
  template <int NT>
  __device__ __forceinline__ static void a_from_acc(uint32_t (&a)[4], const float (&acc)[NT][4], int ks) {
    const float* c = acc[ks];
    a[0] = to_tf32(c[0]), a[1] = to_tf32(c[2]), a[2] = to_tf32(c[1]), a[3] = to_tf32(c[3]);
  }
};

// The 2 accumulator elements of row half `r` (0: row group, 1: row group + 8) of an n8 tile,
// rounded to T and stored at dst[0], dst[1] (dst 4-byte aligned for 16-bit T, 8-byte for float).
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float x0, float x1) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float2*>(dst) = make_float2(x0, x1);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = pack2<T>(x0, x1);
  }
}

}  // namespace armfast::cuda
