// A host emulator for the tensor-core kernels of armfast._C_cuda, so that their index arithmetic,
// fragment layouts, masking, pipelining and synchronisation are tested on a machine without a
// GPU. Compile the kernel sources with g++ and -DARMFAST_EMULATE after including this header.
//
// Each CUDA thread of a block runs as a fiber (ucontext) on one OS thread; blocks run one after
// another. Warp-wide instructions (ldmatrix, mma.sync, shuffles) are collectives: every lane
// deposits its operands, the last lane to arrive computes all 32 results from the PTX ISA's
// definitions (written here independently of csrc/include/armfast/mma_layout.h), then the warp
// resumes. The emulator is deliberately strict:
//   - shared memory starts as 0xff bytes (NaN in every float type) and every ldmatrix/cp.async
//     address is checked against the block's shared memory and alignment;
//   - cp.async copies land at the latest moment the PTX memory model allows (the matching
//     cp.async.wait_group), so reading a tile before waiting for it reads stale data;
//   - a warp collective reached by lanes at different instructions, a barrier reached by only
//     part of a block, or a deadlock is an error;
//   - tf32 operands must have been rounded (cvt.rna.tf32.f32) before the mma;
//   - threads can be scheduled in reverse order, which changes who runs first after each barrier.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace armfast::emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

Dim3 thread_idx();
Dim3 block_idx();
Dim3 block_dim();
Dim3 grid_dim();

void sync_threads();
void sync_warp();
float shfl_xor(float v, int lane_mask);
void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans);
template <typename T>
void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
uint32_t cvt_rna_tf32(float x);
void cp_async(void* dst, const void* src, int cp_size, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
unsigned char* dynamic_smem();
float atomic_add(float* address, float value);

// Global memory a cp.async may read or an atomic may write: the tests register each tensor's
// extent; an access outside every registered range is an error.
void register_global(const void* begin, size_t bytes);
void clear_globals();

// Runs `kernel` for every block of `grid` with `block` threads (1-D blocks).
// Returns "" on success, else what went wrong.
std::string launch(Dim3 grid, Dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& kernel);
void set_reverse_schedule(bool reverse);

}  // namespace armfast::emu

// ---- the CUDA names the kernels use --------------------------------------------------------------
#define threadIdx (::armfast::emu::thread_idx())
#define blockIdx (::armfast::emu::block_idx())
#define blockDim (::armfast::emu::block_dim())
#define gridDim (::armfast::emu::grid_dim())

inline void __syncthreads() { ::armfast::emu::sync_threads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::armfast::emu::sync_warp(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return ::armfast::emu::shfl_xor(v, lane_mask); }
inline float atomicAdd(float* address, float value) { return ::armfast::emu::atomic_add(address, value); }

#undef __shared__
#define __shared__ static
#undef __forceinline__
#define __forceinline__ inline
#define __launch_bounds__(...)
