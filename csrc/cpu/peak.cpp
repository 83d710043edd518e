// The measured peak of the CPU's vector FMA units, the compute ceiling of the benchmark table
// (armfast/bench/ceilings.py). A BLAS matmul is not one on every CPU: torch's float32 matmul ran at
// under 40% of two AVX-512 cores' FMA rate, below our own kernels.
//
// Each thread runs CHAINS independent chains acc = acc * m + b, one vector FMA each per round: an
// FMA waits for the previous one of its chain (4-5 cycles), so latency x FMA ports (2) chains must
// be in flight to keep every port busy; more only use registers. m < 1 and b > 0 keep the chains
// bounded (they tend to b / (1 - m)) and away from subnormals, and the sum of the accumulators is
// returned, so the compiler can neither fold nor drop a round.
#include <chrono>
#include <vector>

#include "isa.h"
#include "kernels.h"
#include "parallel.h"

namespace armfast::cpu {

namespace {

// 16 of AVX-512's 32 vector registers; 12 of the 16 of AVX2 and SSE.
template <class Isa>
constexpr int kChains = Isa::VBYTES == 64 ? 16 : 12;

template <class Isa, typename T>
constexpr int kLanes = Isa::VBYTES / sizeof(T);

struct FmaChains {
  // The ISA's (chains, lanes) in shape[0..1], so the caller can count the FLOPs it did.
  template <class Isa, typename T>
  ARMFAST_INLINE static void run(int64_t iterations, T m, T b, T* sum, int* shape) {
    typedef T V __attribute__((vector_size(Isa::VBYTES)));
    constexpr int C = kChains<Isa>, W = kLanes<Isa, T>;
    V acc[C];
    const V vm = V{} + m, vb = V{} + b;
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[c] = V{} + static_cast<T>(c);
    for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[c] = acc[c] * vm + vb;  // contracted to one FMA
    }
    T s = 0;
    for (int c = 0; c < C; ++c)
      for (int l = 0; l < W; ++l) s += acc[c][l];
    *sum = s;
    shape[0] = C;
    shape[1] = W;
  }
};

}  // namespace

template <typename T>
FmaPeak fma_peak(int64_t iterations, int threads) {
  const int nthreads = threads > 0 ? threads : omp_get_max_threads();
  auto chains = isa_kernel<FmaChains, int64_t, T, T, T*, int*>();
  std::vector<T> sums(nthreads);
  int shape[2] = {0, 0}, ran = 1;  // OpenMP may run fewer threads than asked
  // m and b come through a volatile: values the compiler cannot see, so nothing is precomputed
  volatile T m_in = static_cast<T>(0.999), b_in = static_cast<T>(1e-3);
  const T m = m_in, b = b_in;
  const auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(nthreads)
  {
    int local[2];
    chains(iterations, m, b, &sums[omp_get_thread_num()], local);
    if (omp_get_thread_num() == 0) shape[0] = local[0], shape[1] = local[1], ran = omp_get_num_threads();
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double checksum = 0;
  for (int t = 0; t < ran; ++t) checksum += static_cast<double>(sums[t]);
  const double flops = 2.0 * ran * static_cast<double>(iterations) * shape[0] * shape[1];
  return FmaPeak{flops, seconds, ran, shape[0], shape[1], checksum};
}

template FmaPeak fma_peak<float>(int64_t, int);
template FmaPeak fma_peak<double>(int64_t, int);

}  // namespace armfast::cpu
