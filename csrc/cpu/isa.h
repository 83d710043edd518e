// Run-time choice of the instruction set: each kernel is a functor `F` with an always-inline
// `template <class Isa, typename... A> static void run(A...)`; `isa_kernel<F, A...>()` returns a
// pointer to F::run compiled inside a function targeted at the best ISA this CPU supports.
#pragma once

#include "simd.h"

namespace armfast::cpu {

enum class IsaLevel { generic = 0, avx2 = 1, avx512 = 2 };

// Best level the CPU supports, capped by ARMFAST_CPU_ISA (generic/avx2/avx512) when set.
IsaLevel isa_level();
const char* isa_name(IsaLevel level);

template <class F, typename... A>
void run_generic(A... args) {
  F::template run<IsaGeneric>(args...);
}

#if ARMFAST_X86_DISPATCH
template <class F, typename... A>
ARMFAST_TARGET_AVX2 void run_avx2(A... args) {
  F::template run<IsaAvx2>(args...);
}
template <class F, typename... A>
ARMFAST_TARGET_AVX512 void run_avx512(A... args) {
  F::template run<IsaAvx512>(args...);
}
#endif

template <class F, typename... A>
auto isa_kernel() -> void (*)(A...) {
#if ARMFAST_X86_DISPATCH
  switch (isa_level()) {
    case IsaLevel::avx512: return &run_avx512<F, A...>;
    case IsaLevel::avx2: return &run_avx2<F, A...>;
    default: break;
  }
#endif
  return &run_generic<F, A...>;
}

}  // namespace armfast::cpu
