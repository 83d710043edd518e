// Prints the lane/register maps of csrc/include/armfast/mma_layout.h, one line per map:
//   name lane i row col     (fragment maps; i = element index)
//   name lane row col       (ldmatrix addressing patterns: the tile row and column lane addresses)
//   tf32_k kk k
// for tests/ops/test_cuda_emulated.py, which checks them against the PTX ISA. Plain C++, no CUDA.
#include <cstdio>

#include "armfast/mma_layout.h"

namespace m = armfast::mma;

int main() {
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) std::printf("c %d %d %d %d\n", lane, i, m::c_row(lane, i), m::c_col(lane, i));
    for (int i = 0; i < 8; ++i) std::printf("a16 %d %d %d %d\n", lane, i, m::a16_row(lane, i), m::a16_col(lane, i));
    for (int i = 0; i < 4; ++i) std::printf("b16 %d %d %d %d\n", lane, i, m::b16_row(lane, i), m::b16_col(lane, i));
    for (int i = 0; i < 4; ++i) std::printf("a8 %d %d %d %d\n", lane, i, m::a8_row(lane, i), m::a8_col(lane, i));
    for (int i = 0; i < 2; ++i) std::printf("b8 %d %d %d %d\n", lane, i, m::b8_row(lane, i), m::b8_col(lane, i));
    std::printf("rows16 %d %d %d\n", lane, m::ldsm_rows16_row(lane), m::ldsm_rows16_col(lane));
    std::printf("cols16 %d %d %d\n", lane, m::ldsm_cols16_row(lane), m::ldsm_cols16_col(lane));
  }
  for (int kk = 0; kk < 8; ++kk) std::printf("tf32_k %d %d\n", kk, m::tf32_k(kk));
  return 0;
}
