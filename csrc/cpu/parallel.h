// OpenMP helpers of the CPU kernels (and stand-ins, so a build without OpenMP still compiles).
#pragma once

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_thread_num() { return 0; }
inline int omp_get_max_threads() { return 1; }
inline int omp_get_num_threads() { return 1; }
#endif

namespace armfast::cpu {

// Threads worth waking for `flops` of work, at most `threads` (<= 0: OpenMP's default). Waking a
// sleeping OpenMP thread costs microseconds on an idle machine and a scheduler time slice on a
// busy one, so small problems run on one thread.
inline int threads_for(int threads, double flops) {
  constexpr double kFlopsPerThread = 4e6;
  const int requested = threads > 0 ? threads : omp_get_max_threads();
  const double useful = flops / kFlopsPerThread;
  if (useful < 1.0) return 1;
  return useful < requested ? static_cast<int>(useful) : requested;
}

}  // namespace armfast::cpu
