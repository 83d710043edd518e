// Portable SIMD building blocks of the CPU kernels: an instruction-set description, a register-
// blocked GEMM micro-kernel written with GCC/Clang vector extensions, and a vectorisable exp.
//
// Everything here is `always_inline` and parameterised by an `Isa*` struct, so the same source is
// compiled once per instruction set inside functions carrying a `target` attribute (see
// attention.cpp): a generic build still runs AVX2 / AVX-512 code on machines that have them.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#define ARMFAST_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ARMFAST_X86_DISPATCH 1
#define ARMFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define ARMFAST_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#else
#define ARMFAST_X86_DISPATCH 0
#endif

namespace armfast::cpu {

// Instruction sets the kernels are compiled for. VBYTES: vector register width; R x NV: rows x
// vectors of the GEMM micro-tile, sized so that accumulators plus operands fit the register file
// (16 registers for SSE/AVX2, 32 for AVX-512).
struct IsaGeneric {
  static constexpr int VBYTES = 16, R = 4, NV = 2;
};
struct IsaAvx2 {
  static constexpr int VBYTES = 32, R = 4, NV = 2;
};
struct IsaAvx512 {
  static constexpr int VBYTES = 64, R = 4, NV = 4;
};

// Widest vector in elements of T over all Isa structs: buffers padded to a multiple of it suit all.
template <typename T>
constexpr int64_t kMaxLanes = 64 / sizeof(T);

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
template <typename T>
ARMFAST_INLINE T min_of(T a, T b) { return a < b ? a : b; }
template <typename T>
ARMFAST_INLINE T max_of(T a, T b) { return a < b ? b : a; }

// exp for the softmax. float: Cephes-style range reduction exp(x) = 2^n e^r, |r| <= ln2/2, with a
// degree-6 polynomial (about 1 ulp), written without library calls so `omp simd` vectorises it.
// Arguments below -87 (weights under 1e-37 next to the row maximum's 1) give exactly 0, and so
// does -inf, which the kernels use for masking. double (used for exact tests) keeps std::exp.
ARMFAST_INLINE float fast_exp(float x_in) {
  const float x = x_in < -87.0f ? -87.0f : (x_in > 88.0f ? 88.0f : x_in);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;  // n in [-126, 127]: a normal 2^n
  const float y = p * __builtin_bit_cast(float, e << 23);
  return x_in < -87.0f ? 0.0f : y;
}
ARMFAST_INLINE double fast_exp(double x) { return std::exp(x); }

// How a micro-tile's accumulators start: at zero, from C, or from C scaled by alpha[r] per row.
enum class Start { zero, load, scaled };

// C[0:R, 0:NV*W] = start + A[0:R, 0:K] * B[0:K, 0:NV*W], A read as a[r*sar + k*sak] (any strides:
// row-major, or a transposed tile), B rows ldb apart: R rows of A broadcast against NV vectors of
// B's row k; the R*NV accumulators stay in registers for the whole K loop.
template <typename T, class Isa, int R, int NV, Start START>
ARMFAST_INLINE void micro_tile(int64_t K, const T* a, int64_t sar, int64_t sak, const T* b,
                               int64_t ldb, T* c, int64_t ldc, const T* alpha = nullptr) {
  typedef T V __attribute__((vector_size(Isa::VBYTES)));
  constexpr int W = Isa::VBYTES / sizeof(T);
  V acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      if constexpr (START == Start::zero) {
        acc[r][j] = V{};
      } else {
        __builtin_memcpy(&acc[r][j], c + r * ldc + j * W, sizeof(V));
        if constexpr (START == Start::scaled) acc[r][j] *= alpha[r];
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V y[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) __builtin_memcpy(&y[j], b + k * ldb + j * W, sizeof(V));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T s = a[r * sar + k * sak];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] += s * y[j];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) __builtin_memcpy(c + r * ldc + j * W, &acc[r][j], sizeof(V));
  }
}

// C[0:R, 0:NV*W] (+)= A[0:R, 0:K] * B[0:K, 0:NV*W], A row-major (lda), R = Isa::R.
template <typename T, class Isa, int NV>
ARMFAST_INLINE void gemm_micro(int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                               int64_t ldc, bool accumulate) {
  if (accumulate)
    micro_tile<T, Isa, Isa::R, NV, Start::load>(K, a, lda, 1, b, ldb, c, ldc);
  else
    micro_tile<T, Isa, Isa::R, NV, Start::zero>(K, a, lda, 1, b, ldb, c, ldc);
}

// Picks the micro-kernel of width nv <= NV for the last, narrower column block.
template <typename T, class Isa, int NV>
ARMFAST_INLINE void gemm_micro_n(int nv, int64_t K, const T* a, int64_t lda, const T* b,
                                 int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  if constexpr (NV > 1) {
    if (nv < NV) {
      gemm_micro_n<T, Isa, NV - 1>(nv, K, a, lda, b, ldb, c, ldc, accumulate);
      return;
    }
  }
  gemm_micro<T, Isa, NV>(K, a, lda, b, ldb, c, ldc, accumulate);
}

// C[M, N] (+)= A[M, K] * B[K, N], all row-major in local buffers. M must be a multiple of Isa::R
// and N of the vector width: callers zero-pad their tiles so that it is.
template <typename T, class Isa>
ARMFAST_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,
                         int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int R = Isa::R, W = Isa::VBYTES / sizeof(T), NV = Isa::NV;
  for (int64_t i = 0; i < M; i += R) {
    for (int64_t j = 0; j < N; j += NV * W) {
      const int nv = static_cast<int>(min_of<int64_t>(NV, (N - j) / W));
      gemm_micro_n<T, Isa, NV>(nv, K, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc,
                               accumulate);
    }
  }
}

}  // namespace armfast::cpu
