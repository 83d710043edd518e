// Implementation of emulator.h. The PTX semantics below follow the PTX ISA text ("Matrix
// Fragments for mma.m16n8k16 with floating point type", "... mma.m16n8k8" for .tf32, "ldmatrix",
// "cp.async"); they deliberately do not use csrc/include/armfast/mma_layout.h, which they check.
#include "emulator.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

namespace armfast::emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarp = 32;

enum class State { runnable, wait_block, wait_warp, done };

struct Copy {
  void* dst;
  const void* src;
  int size, src_bytes;
};

struct Fiber {
  ucontext_t ctx{};
  std::unique_ptr<char[]> stack;
  unsigned tid = 0;
  State state = State::runnable;
  std::vector<Copy> open_group;                // cp.async issued since the last commit
  std::deque<std::vector<Copy>> committed;     // oldest first
};

// Operands of one warp collective, one slot per lane.
struct Slot {
  unsigned char in[64];
  unsigned char out[64];
};

struct Warp {
  int arrived = 0;
  const char* op = nullptr;
  Slot slot[kWarp];
  std::function<void(Warp&)> compute;
};

struct Block {
  std::vector<Fiber>* fibers = nullptr;
  std::vector<Warp> warps;
  int arrived = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
};

struct Runtime {
  ucontext_t main_ctx{};
  std::vector<Fiber> fibers;
  Block block;
  Fiber* current = nullptr;
  Dim3 grid, block_dim, block_idx;
  const std::function<void()>* kernel = nullptr;
  std::string error;
  bool reverse = false;
  std::vector<std::pair<const unsigned char*, size_t>> globals;
};

Runtime& rt() {
  static Runtime r;
  return r;
}

struct Abort {};  // unwinds a fiber after an error

[[noreturn]] void fail(const std::string& what) {
  Runtime& r = rt();
  if (r.error.empty()) {
    r.error = what + " (block " + std::to_string(r.block_idx.x) + ", thread " +
              std::to_string(r.current ? r.current->tid : 0) + ")";
  }
  throw Abort{};
}

void yield() {
  Runtime& r = rt();
  swapcontext(&r.current->ctx, &r.main_ctx);
  if (!r.error.empty()) throw Abort{};  // another fiber failed: unwind this one too
}

void fiber_entry() {
  Runtime& r = rt();
  try {
    (*r.kernel)();
  } catch (const Abort&) {
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = std::string("exception in kernel: ") + e.what();
  }
  r.current->state = State::done;
  if (!r.current->open_group.empty() || !r.current->committed.empty()) {
    // cp.async still in flight when the thread exits: its data would be lost on a GPU.
    if (r.error.empty()) r.error = "thread " + std::to_string(r.current->tid) + " exited with cp.async in flight";
  }
  // returning resumes main_ctx through uc_link
}

bool in_smem(const void* p, size_t bytes) {
  const Block& b = rt().block;
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= b.smem && c + bytes <= b.smem + b.smem_bytes;
}

void check_global(const void* p, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (const auto& [begin, size] : rt().globals)
    if (c >= begin && c + bytes <= begin + size) return;
  fail(std::string(what) + ": global address outside every registered tensor");
}

// Deposits `in` (n bytes) in this lane's slot; the last lane of the warp to arrive runs
// `compute` over all slots; returns this lane's out slot.
const unsigned char* collective(const char* op, const void* in, size_t n, const std::function<void(Warp&)>& compute) {
  Runtime& r = rt();
  const unsigned lane = r.current->tid % kWarp;
  Warp& w = r.block.warps[r.current->tid / kWarp];
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail(std::string("divergent warp: lanes at ") + w.op + " and " + op);
  }
  std::memcpy(w.slot[lane].in, in, n);
  if (++w.arrived == kWarp) {
    compute(w);
    w.arrived = 0;
    Fiber* fibers = r.fibers.data() + (r.current->tid / kWarp) * kWarp;
    for (int l = 0; l < kWarp; ++l)
      if (fibers[l].state == State::wait_warp) fibers[l].state = State::runnable;
  } else {
    r.current->state = State::wait_warp;
    yield();
  }
  return w.slot[lane].out;
}

template <typename T>
T load_as(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    __nv_bfloat16 b;
    std::memcpy(&b, &bits, 2);
    return __bfloat162float(b);
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

void complete_copies(std::vector<Copy>& group) {
  for (const Copy& c : group) {
    std::memset(c.dst, 0, c.size);
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
  }
  group.clear();
}

}  // namespace

Dim3 thread_idx() { return Dim3{rt().current->tid, 0, 0}; }
Dim3 block_idx() { return rt().block_idx; }
Dim3 block_dim() { return rt().block_dim; }
Dim3 grid_dim() { return rt().grid; }

void sync_threads() {
  Runtime& r = rt();
  Block& b = r.block;
  for (const Fiber& f : r.fibers)
    if (f.state == State::done) fail("__syncthreads after some threads of the block exited");
  if (++b.arrived == static_cast<int>(r.fibers.size())) {
    b.arrived = 0;
    for (Fiber& f : r.fibers)
      if (f.state == State::wait_block) f.state = State::runnable;
    return;
  }
  r.current->state = State::wait_block;
  yield();
}

void sync_warp() {
  const int dummy = 0;
  collective("__syncwarp", &dummy, sizeof dummy, [](Warp&) {});
}

float shfl_xor(float v, int lane_mask) {
  if (lane_mask < 0 || lane_mask >= kWarp) fail("shfl_xor: lane mask out of range");
  const unsigned char* out = collective("shfl.xor", &v, sizeof v, [lane_mask](Warp& w) {
    for (int l = 0; l < kWarp; ++l) std::memcpy(w.slot[l].out, w.slot[l ^ lane_mask].in, sizeof(float));
  });
  return load_as<float>(out);
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: threads 8 i .. 8 i + 7 give the addresses of
// rows 0..7 of matrix i; each thread receives, in register i, two consecutive elements of row
// laneid / 4 of matrix i at columns 2 (laneid % 4) and 2 (laneid % 4) + 1; with .trans the matrix
// is delivered transposed (element (row, col) of the stored matrix arrives where (col, row) would).
void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (!in_smem(row, 16)) fail("ldmatrix: row address outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
  const unsigned char* out = collective(trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", &row, sizeof row, [trans](Warp& w) {
    auto elem = [&w](int matrix, int mrow, int mcol) {  // element (mrow, mcol) of 8x8 matrix `matrix`
      const auto* p = load_as<const uint16_t*>(w.slot[8 * matrix + mrow].in);
      return p[mcol];
    };
    for (int lane = 0; lane < kWarp; ++lane) {
      uint32_t regs[4];
      for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) {
          lo = elem(i, lane / 4, 2 * (lane % 4));
          hi = elem(i, lane / 4, 2 * (lane % 4) + 1);
        } else {
          lo = elem(i, 2 * (lane % 4), lane / 4);
          hi = elem(i, 2 * (lane % 4) + 1, lane / 4);
        }
        regs[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
      std::memcpy(w.slot[lane].out, regs, sizeof regs);
    }
  });
  std::memcpy(r, out, sizeof r);
}

namespace {

struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};

// Fragment layouts of the PTX ISA, groupID = laneid >> 2, threadID_in_group = laneid % 4.
// m16n8k16 .f16/.bf16: A element ai (i = 0..7, register i / 2, low half first)
//   row = groupID for 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise
//   col = threadID_in_group * 2 + (i & 1) (+ 8 for i >= 4)
// B element bi (i = 0..3): row = threadID_in_group * 2 + (i & 1) (+ 8 for i >= 2), col = groupID
// C element ci (i = 0..3): row = groupID (+ 8 for i >= 2), col = threadID_in_group * 2 + (i & 1)
// m16n8k8 .tf32: A ai (i = 0..3): row = groupID (+ 8 for a1, a3), col = threadID_in_group (+ 4 for a2, a3)
//                B bi (i = 0..1): row = threadID_in_group (+ 4 for b1), col = groupID
void mma_compute(Warp& w, int kind) {  // kind: 0 f16, 1 bf16, 2 tf32
  const int K = kind == 2 ? 8 : 16;
  double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
  bool seen_a[16][16] = {}, seen_b[16][8] = {};
  for (int lane = 0; lane < kWarp; ++lane) {
    const MmaIn in = load_as<MmaIn>(w.slot[lane].in);
    const int group = lane >> 2, tig = lane % 4;
    if (kind == 2) {
      for (int i = 0; i < 4; ++i) {
        const int row = group + ((i == 1 || i == 3) ? 8 : 0), col = tig + (i >= 2 ? 4 : 0);
        if (in.a[i] & 0x1fffu) fail("mma.tf32: A operand not rounded to tf32");
        A[row][col] = load_as<float>(&in.a[i]);
        seen_a[row][col] = true;
      }
      for (int i = 0; i < 2; ++i) {
        const int row = tig + (i == 1 ? 4 : 0), col = group;
        if (in.b[i] & 0x1fffu) fail("mma.tf32: B operand not rounded to tf32");
        B[row][col] = load_as<float>(&in.b[i]);
        seen_b[row][col] = true;
      }
    } else {
      for (int i = 0; i < 8; ++i) {
        const int row = group + ((i < 2 || (i >= 4 && i < 6)) ? 0 : 8);
        const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        const uint16_t bits = static_cast<uint16_t>(in.a[i / 2] >> (16 * (i % 2)));
        A[row][col] = half_bits_to_float(bits, kind == 1);
        seen_a[row][col] = true;
      }
      for (int i = 0; i < 4; ++i) {
        const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0), col = group;
        const uint16_t bits = static_cast<uint16_t>(in.b[i / 2] >> (16 * (i % 2)));
        B[row][col] = half_bits_to_float(bits, kind == 1);
        seen_b[row][col] = true;
      }
    }
    for (int i = 0; i < 4; ++i) C[group + (i >= 2 ? 8 : 0)][tig * 2 + (i & 1)] = in.c[i];
  }
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < K; ++k)
      if (!seen_a[r][k]) fail("mma: A fragment does not cover the matrix");
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < 8; ++n)
      if (!seen_b[k][n]) fail("mma: B fragment does not cover the matrix");
  for (int lane = 0; lane < kWarp; ++lane) {
    const int group = lane >> 2, tig = lane % 4;
    float d[4];
    for (int i = 0; i < 4; ++i) {
      const int row = group + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
      double acc = 0;
      for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];
      d[i] = static_cast<float>(acc + C[row][col]);
    }
    std::memcpy(w.slot[lane].out, d, sizeof d);
  }
}

void mma_kind(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], int kind, const char* op) {
  MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, d, sizeof in.c);
  const unsigned char* out = collective(op, &in, sizeof in, [kind](Warp& w) { mma_compute(w, kind); });
  std::memcpy(d, out, sizeof d);
}

}  // namespace

template <>
void mma<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_kind(d, a, b, 0, "mma.m16n8k16.f16");
}
template <>
void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_kind(d, a, b, 1, "mma.m16n8k16.bf16");
}
template <>
void mma<float>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_kind(d, a, b, 2, "mma.m16n8k8.tf32");
}

// cvt.rna.tf32.f32: round to the nearest tf32 (10 explicit mantissa bits), ties away from zero.
uint32_t cvt_rna_tf32(float x) {
  uint32_t bits = load_as<uint32_t>(&x);
  if ((bits & 0x7f800000u) == 0x7f800000u) {  // inf / NaN: keep (NaN stays NaN)
    return (bits & 0x1fffu) ? (bits | 0x00400000u) & 0xffffe000u : bits;
  }
  bits += 0x1000u;  // half of the last kept bit; the carry may round up to the next binade / inf
  return bits & 0xffffe000u;
}

void cp_async(void* dst, const void* src, int cp_size, int src_bytes) {
  if (cp_size != 16) fail("cp.async.cg: cp-size must be 16");
  if (src_bytes < 0 || src_bytes > cp_size) fail("cp.async: src-size out of range");
  if (!in_smem(dst, cp_size)) fail("cp.async: destination outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fail("cp.async: addresses not 16-byte aligned");
  if (src_bytes > 0) check_global(src, src_bytes, "cp.async");
  rt().current->open_group.push_back(Copy{dst, src, cp_size, src_bytes});
}

void cp_async_commit() {
  Fiber& f = *rt().current;
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void cp_async_wait(int n) {
  Fiber& f = *rt().current;
  while (static_cast<int>(f.committed.size()) > n) {
    complete_copies(f.committed.front());
    f.committed.pop_front();
  }
}

unsigned char* dynamic_smem() { return rt().block.smem; }

float atomic_add(float* address, float value) {
  check_global(address, sizeof(float), "atomicAdd");
  const float old = *address;
  *address = old + value;
  return old;
}

void register_global(const void* begin, size_t bytes) {
  rt().globals.emplace_back(static_cast<const unsigned char*>(begin), bytes);
}
void clear_globals() { rt().globals.clear(); }
void set_reverse_schedule(bool reverse) { rt().reverse = reverse; }

std::string launch(Dim3 grid, Dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& kernel) {
  Runtime& r = rt();
  if (block.y != 1 || block.z != 1) return "emulator: 1-D blocks only";
  if (block.x == 0 || block.x % kWarp != 0 || block.x > 1024) return "emulator: block size must be a multiple of 32 up to 1024";
  r.error.clear();
  r.grid = grid;
  r.block_dim = block;
  r.kernel = &kernel;
  // A guard zone past the block's shared memory: reads there return NaN bytes, writes are reported.
  constexpr size_t kGuard = 4096;
  const size_t smem_alloc = std::max<size_t>(dynamic_smem_bytes, 16) + kGuard;
  std::unique_ptr<unsigned char[]> smem_buf(new unsigned char[smem_alloc + 128]);
  auto* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_buf.get()) + 127) / 128 * 128);
  r.fibers.resize(block.x);
  for (Fiber& f : r.fibers)
    if (!f.stack) f.stack.reset(new char[kStackBytes]);

  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t bi = 0; bi < blocks && r.error.empty(); ++bi) {
    const unsigned bx = static_cast<unsigned>(bi % grid.x);
    r.block_idx = Dim3{bx, static_cast<unsigned>(bi / grid.x % grid.y), static_cast<unsigned>(bi / grid.x / grid.y)};
    std::memset(smem, 0xff, smem_alloc);  // NaN in every float type
    r.block.smem = smem;
    r.block.smem_bytes = dynamic_smem_bytes;
    r.block.arrived = 0;
    r.block.warps.assign(block.x / kWarp, Warp{});
    for (unsigned t = 0; t < block.x; ++t) {
      Fiber& f = r.fibers[t];
      f.tid = t;
      f.state = State::runnable;
      f.open_group.clear();
      f.committed.clear();
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = &r.main_ctx;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    for (;;) {
      bool ran = false, all_done = true;
      for (unsigned i = 0; i < block.x; ++i) {
        Fiber& f = r.fibers[r.reverse ? block.x - 1 - i : i];
        if (f.state != State::done) all_done = false;
        if (f.state != State::runnable) continue;
        r.current = &f;
        ran = true;
        swapcontext(&r.main_ctx, &f.ctx);
        r.current = nullptr;
        if (!r.error.empty()) break;
      }
      if (!r.error.empty()) {
        // Unwind every fiber still parked, so their stacks' destructors run.
        for (Fiber& f : r.fibers) {
          if (f.state == State::done) continue;
          r.current = &f;
          swapcontext(&r.main_ctx, &f.ctx);  // resumes in yield(), which throws Abort
          r.current = nullptr;
        }
        break;
      }
      if (all_done) {
        for (size_t i = dynamic_smem_bytes; i < dynamic_smem_bytes + kGuard; ++i)
          if (smem[i] != 0xff) {
            r.error = "shared memory written past the " + std::to_string(dynamic_smem_bytes) + " bytes the launch asked for";
            break;
          }
        break;
      }
      if (!ran) {
        r.error = "deadlock: every live thread waits at a barrier that cannot complete (block " +
                  std::to_string(bi) + ")";
        for (Fiber& f : r.fibers) {
          if (f.state == State::done) continue;
          r.current = &f;
          swapcontext(&r.main_ctx, &f.ctx);
          r.current = nullptr;
        }
        break;
      }
    }
  }
  r.block.smem = nullptr;
  return r.error;
}

}  // namespace armfast::emu
