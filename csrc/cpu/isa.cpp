// Detection of the instruction set the CPU kernels run with.
#include "isa.h"

#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace armfast::cpu {

namespace {
IsaLevel hardware_level() {
#if ARMFAST_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma"))
    return IsaLevel::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return IsaLevel::avx2;
#endif
  return IsaLevel::generic;
}
}  // namespace

IsaLevel isa_level() {
  static const IsaLevel hw = hardware_level();
  IsaLevel cap = IsaLevel::avx512;
  if (const char* env = std::getenv("ARMFAST_CPU_ISA")) {  // read per call: tests switch it
    if (std::strcmp(env, "generic") == 0) cap = IsaLevel::generic;
    else if (std::strcmp(env, "avx2") == 0) cap = IsaLevel::avx2;
  }
  return static_cast<int>(cap) < static_cast<int>(hw) ? cap : hw;
}

const char* isa_name(IsaLevel level) {
  switch (level) {
    case IsaLevel::avx512: return "avx512";
    case IsaLevel::avx2: return "avx2";
    default: return "generic";
  }
}

const char* active_isa() { return isa_name(isa_level()); }

}  // namespace armfast::cpu
