// Where each element of a warp-level tensor-core operand lives: lane/register -> (row, col) maps
// of mma.sync m16n8k16 (f16/bf16) and m16n8k8 (tf32), and the row each lane addresses in the
// ldmatrix loads that build those operands. Pure index arithmetic, compiled for the host too, so
// the tests check every map against the PTX ISA tables without a GPU.
//
// Notation (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k8"):
//   group = lane / 4 ("groupID"), quad = lane % 4 ("threadID_in_group").
// Element i of a fragment is the i-th scalar of the lane's registers, low half first for the
// 16-bit types (register i / 2 holds elements i and i + 1 of f16/bf16 fragments).
#pragma once

#if defined(__CUDACC__)
#define ARMFAST_HD __host__ __device__ __forceinline__
#else
#define ARMFAST_HD inline
#endif

namespace armfast::mma {

ARMFAST_HD constexpr int lane_group(int lane) { return lane >> 2; }
ARMFAST_HD constexpr int lane_quad(int lane) { return lane & 3; }

// ---- accumulator C/D of m16n8 (4 x fp32 per lane): the same for k16 and k8 ----------------------
// c0, c1 on row `group`, c2, c3 on row `group + 8`; columns 2 * quad + (i & 1).
ARMFAST_HD constexpr int c_row(int lane, int i) { return lane_group(lane) + 8 * (i >> 1); }
ARMFAST_HD constexpr int c_col(int lane, int i) { return 2 * lane_quad(lane) + (i & 1); }

// ---- m16n8k16, f16 / bf16 -----------------------------------------------------------------------
// A (16 x 16, 8 elements in 4 registers): rows group (+8 for elements 2, 3, 6, 7), columns
// 2 * quad + (i & 1) (+8 for elements 4..7).
ARMFAST_HD constexpr int a16_row(int lane, int i) { return lane_group(lane) + 8 * ((i >> 1) & 1); }
ARMFAST_HD constexpr int a16_col(int lane, int i) { return 2 * lane_quad(lane) + (i & 1) + 8 * (i >> 2); }
// B (16 x 8, 4 elements in 2 registers): k rows 2 * quad + (i & 1) (+8 for elements 2, 3),
// column (n) group.
ARMFAST_HD constexpr int b16_row(int lane, int i) { return 2 * lane_quad(lane) + (i & 1) + 8 * (i >> 1); }
ARMFAST_HD constexpr int b16_col(int lane, int /*i*/) { return lane_group(lane); }

// ---- m16n8k8, tf32 --------------------------------------------------------------------------------
// A (16 x 8, 4 registers): rows group (+8 for a1, a3), columns quad (+4 for a2, a3).
ARMFAST_HD constexpr int a8_row(int lane, int i) { return lane_group(lane) + 8 * (i & 1); }
ARMFAST_HD constexpr int a8_col(int lane, int i) { return lane_quad(lane) + 4 * (i >> 1); }
// B (8 x 8, 2 registers): k rows quad (+4 for b1), column group.
ARMFAST_HD constexpr int b8_row(int lane, int i) { return lane_quad(lane) + 4 * i; }
ARMFAST_HD constexpr int b8_col(int lane, int /*i*/) { return lane_group(lane); }

// The tf32 kernels relabel k inside every 8-wide k step: the instruction's k index kk stands for
// the tile's column tf32_k(kk), so that k = quad -> 2 * quad and k = quad + 4 -> 2 * quad + 1.
// Then the two accumulator columns a lane owns (2 * quad, 2 * quad + 1) are exactly the A
// elements it must supply (a0/a1 and a2/a3), and P = softmax(S) feeds the next product from
// registers with no shuffle. A and B of one product use the same relabelling, so the sum over k
// is unchanged.
ARMFAST_HD constexpr int tf32_k(int kk) { return kk < 4 ? 2 * kk : 2 * (kk - 4) + 1; }

// ---- ldmatrix.m8n8.x4 (b16) -----------------------------------------------------------------------
// Lane l supplies the address of row l % 8 of 8x8 matrix l / 8; register r of lane l receives
// matrix r's elements (row l / 4, columns 2 (l % 4), 2 (l % 4) + 1); with .trans, the elements
// (rows 2 (l % 4), 2 (l % 4) + 1; column l / 4) instead.
//
// Our loads of a 16 x 16 block of a row-major tile (element (r, c) at tile[r * ld + c]) use two
// addressing patterns; each gives the (row, col) of the tile where lane l's address points.
//
// "rows16": matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15),
// (rows 8-15, cols 8-15). Used for
//   A of m16n8k16 from a row-major [m][k] tile (registers: a0a1, a2a3, a4a5, a6a7), and
//   B of two n8 tiles from a k-major [k][n] tile with .trans (b[0][0], b[0][1], b[1][0], b[1][1]).
ARMFAST_HD constexpr int ldsm_rows16_row(int lane) { return lane % 16; }
ARMFAST_HD constexpr int ldsm_rows16_col(int lane) { return 8 * (lane / 16); }
// "cols16": matrices (rows 0-7, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 0-7),
// (rows 8-15, cols 8-15). Used for
//   B of two n8 tiles from an n-major [n][k] tile (b[0][0], b[0][1], b[1][0], b[1][1]), and
//   A of m16n8k16 from a k-major [k][m] tile with .trans (a0a1, a2a3, a4a5, a6a7).
ARMFAST_HD constexpr int ldsm_cols16_row(int lane) { return lane % 8 + 8 * (lane / 16); }
ARMFAST_HD constexpr int ldsm_cols16_col(int lane) { return 8 * ((lane / 8) % 2); }

}  // namespace armfast::mma
