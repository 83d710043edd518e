// Cosine patch-text logits on CUDA: out = s * normalize(x) normalize(text)^T and its backward,
// float16 / bfloat16 / float32 with fp32 accumulation, strided inputs, deterministic.
//
// x [B, N, E] is handled as B*N rows. Kernels:
//   row_norms     one warp per row: 1 / max(|row|, eps) and the mask [|row| >= eps]
//   gemm          out[m, n] = epilogue(sum_k A(m, k) B(k, n) kscale[k]), 64x64 tiles, fp32 FMA;
//                 A and B are read through index maps, so strided and transposed views need no copy
//   project_rows  grad = s * inv * (y - mask * y_hat <y, y_hat>): the normalisation's backward
//   sum           dlogit_scale = sum of the per-row <y, x_hat> in a fixed order
// Backward (math as armfast/ops/_reference.py): y = dout normalize(text), z = dout^T normalize(x);
// dx, dtext come from project_rows, dlogit_scale = sum_rows <y, x_hat>.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "armfast/cuda_utils.cuh"
#include "kernels.h"

namespace armfast::cuda {
namespace {

constexpr float kNormEps = 1e-12f;  // as torch.nn.functional.normalize

// Offset of logical index i along one dim. x's row index r = b*N + n needs two strides:
// (r / n_inner) * s_outer + (r % n_inner) * s_inner; n_inner = 0 means a plain i * s_inner.
struct Index {
  int64_t n_inner, s_outer, s_inner;
  __device__ __forceinline__ int64_t operator()(int64_t i) const {
    return n_inner ? (i / n_inner) * s_outer + (i % n_inner) * s_inner : i * s_inner;
  }
};

Index plain(int64_t stride) { return Index{0, 0, stride}; }

// ---- row norms -------------------------------------------------------------------------------
constexpr int kRowThreads = 256, kRowWarps = kRowThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kRowThreads) row_norms_kernel(const T* a, Index row, int64_t s_col,
                                                                int64_t rows, int64_t E, float* inv,
                                                                float* mask) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;  // whole warps leave together
  const T* p = a + row(r);
  float ss = 0.0f;
  for (int64_t e = lane; e < E; e += 32) {
    const float v = to_float(p[e * s_col]);
    ss = fmaf(v, v, ss);
  }
  ss = warp_sum(ss);
  if (lane == 0) {
    const float norm = sqrtf(ss);
    inv[r] = 1.0f / fmaxf(norm, kNormEps);
    mask[r] = norm >= kNormEps ? 1.0f : 0.0f;
  }
}

// ---- tiled GEMM ------------------------------------------------------------------------------
constexpr int kBM = 64, kBN = 64, kBK = 16, kGemmThreads = 256;

template <typename TIn, typename TOut>
struct GemmArgs {
  const TIn* a;
  Index a_row, a_col;  // A(m, k) = a[a_row(m) + a_col(k)]
  const TIn* b;
  Index b_row, b_col;  // B(k, n) = b[b_row(k) + b_col(n)]
  const float* kscale;                          // B(k, n) *= kscale[k], or null
  const float *mscale, *nscale, *sscale;        // out *= mscale[m] * nscale[n] * sscale[0], or null
  TOut* out;
  Index o_row;  // out(m, n) = out[o_row(m) + n * o_col]
  int64_t o_col;
  int64_t M, N, K;
};

// Each block computes a 64 x 64 output tile; thread (ty, tx) of a 16 x 16 grid owns rows
// ty + 16i and columns tx + 16j. A is staged transposed so both operands are read as rows.
template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(const GemmArgs<TIn, TOut> g) {
  // Staging: consecutive threads walk k in A and n in B; each thread loads kLoads elements of each,
  // A(mm_a + l * kStepA, kk_a) and B(kk_b + l * kStepB, nn_b) for l < kLoads.
  constexpr int kLoads = kBM * kBK / kGemmThreads, kStepA = kGemmThreads / kBK, kStepB = kGemmThreads / kBN;
  static_assert(kBM == kBN && kGemmThreads % kBK == 0 && kGemmThreads % kBN == 0,
                "the A and B tiles split evenly over the threads");
  __shared__ float as[kBK][kBM + 1];
  __shared__ float bs[kBK][kBN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int mm_a = threadIdx.x / kBK, kk_a = threadIdx.x % kBK;
  const int kk_b = threadIdx.x / kBN, nn_b = threadIdx.x % kBN;

  // The rows of A and the column of B a thread stages are the same for every k0: their offsets
  // (x's rows b*N + n cost a 64-bit division and modulo) are computed once, outside the K loop.
  int64_t a_off[kLoads];
  bool a_ok[kLoads];
#pragma unroll
  for (int l = 0; l < kLoads; ++l) {
    const int64_t m = m0 + mm_a + l * kStepA;
    a_ok[l] = m < g.M;
    a_off[l] = a_ok[l] ? g.a_row(m) : 0;
  }
  const bool b_ok = n0 + nn_b < g.N;
  const int64_t b_off = b_ok ? g.b_col(n0 + nn_b) : 0;

  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < g.K; k0 += kBK) {
    const int64_t ka = k0 + kk_a;
    const bool ka_ok = ka < g.K;
    const int64_t a_col = ka_ok ? g.a_col(ka) : 0;
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      as[kk_a][mm_a + l * kStepA] = (a_ok[l] && ka_ok) ? to_float(g.a[a_off[l] + a_col]) : 0.0f;
      const int kk = kk_b + l * kStepB;
      const int64_t k = k0 + kk;
      float val = 0.0f;
      if (b_ok && k < g.K) {
        val = to_float(g.b[g.b_row(k) + b_off]);
        if (g.kscale) val *= g.kscale[k];
      }
      bs[kk][nn_b] = val;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
  const float s = g.sscale ? g.sscale[0] : 1.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= g.M) continue;
    const float fm = g.mscale ? g.mscale[m] * s : s;
    TOut* out_m = g.out + g.o_row(m);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= g.N) continue;
      const float fn = g.nscale ? g.nscale[n] : 1.0f;
      out_m[n * g.o_col] = from_float<TOut>(acc[i][j] * fm * fn);
    }
  }
}

// ---- backward of the normalisation -----------------------------------------------------------
// For row r with y = y[r, :] (fp32, contiguous) and src_hat = src[r, :] * inv[r]:
//   grad[r, :] = s * inv[r] * (y - mask[r] * src_hat * <y, src_hat>);  dots[r] = <y, src_hat>.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) project_rows_kernel(
    const float* y, int64_t E, const T* src, Index src_row, int64_t src_col, const float* inv,
    const float* mask, const float* scale, T* grad, Index grad_row, int64_t grad_col, float* dots,
    int64_t rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;  // whole warps leave together
  const float iv = inv[r];
  const float* yr = y + r * E;
  const T* sr = src + src_row(r);
  float dot = 0.0f;
  for (int64_t e = lane; e < E; e += 32) dot = fmaf(yr[e], to_float(sr[e * src_col]) * iv, dot);
  dot = warp_sum(dot);
  const float proj = mask[r] * dot, f = scale[0] * iv;
  T* gr = grad + grad_row(r);
  for (int64_t e = lane; e < E; e += 32)
    gr[e * grad_col] = from_float<T>(f * (yr[e] - proj * (to_float(sr[e * src_col]) * iv)));
  if (lane == 0 && dots != nullptr) dots[r] = dot;
}

// out[0] = sum(v[0:n]) with one block: per-thread strided sums, then a tree; the order is fixed,
// so the result is bit-identical from run to run.
constexpr int kSumThreads = 256;
__global__ void __launch_bounds__(kSumThreads) sum_kernel(const float* v, int64_t n, float* out) {
  __shared__ double part[kSumThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kSumThreads) acc += v[i];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kSumThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(part[0]);
}

// ---- host side -------------------------------------------------------------------------------
template <typename T>
const char* dtype_name() {
  if constexpr (std::is_same_v<T, __half>) return "float16";
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bfloat16";
  else return "float32";
}

template <typename T>
std::string kernel_name(const char* base) {
  return std::string(base) + "<" + dtype_name<T>() + ">";
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(ceil_div(rows, kRowWarps)); }

template <typename TIn, typename TOut>
void launch_gemm(const GemmArgs<TIn, TOut>& g, const char* what, cudaStream_t stream) {
  const int64_t gm = ceil_div(g.M, kBM), gn = ceil_div(g.N, kBN);
  if (gm > 0x7fffffffLL || gn > 65535)
    throw std::invalid_argument(std::string("armfast CUDA patch_text_logits: ") + what + " is too large");
  gemm_kernel<TIn, TOut><<<dim3(static_cast<unsigned>(gm), static_cast<unsigned>(gn)), kGemmThreads, 0, stream>>>(g);
  check_launch(kernel_name<TIn>("gemm_kernel") + " (" + what + ")");
}

// Carves the float32 workspace: [rx_inv, rx_mask] (rows), [rt_inv, rt_mask] (classes), then for
// the backward y [rows, E], z [classes, E], dots [rows].
struct Workspace {
  float *inv_x, *mask_x, *inv_t, *mask_t, *y, *z, *dots;
  Workspace(float* w, int64_t rows, int64_t classes, int64_t dim) {
    inv_x = w, mask_x = inv_x + rows, inv_t = mask_x + rows, mask_t = inv_t + classes;
    y = mask_t + classes, z = y + rows * dim, dots = z + classes * dim;
  }
};

template <typename T>
void norms(const LogitsShape& s, const Strided& x, const Strided& text, const Workspace& w,
           cudaStream_t stream) {
  const int64_t rows = s.B * s.N;
  row_norms_kernel<T><<<row_blocks(rows), kRowThreads, 0, stream>>>(
      static_cast<const T*>(x.data), Index{s.N, x.stride[0], x.stride[1]}, x.stride[2], rows, s.E,
      w.inv_x, w.mask_x);
  check_launch(kernel_name<T>("row_norms_kernel") + " (x)");
  row_norms_kernel<T><<<row_blocks(s.C), kRowThreads, 0, stream>>>(
      static_cast<const T*>(text.data), plain(text.stride[0]), text.stride[1], s.C, s.E, w.inv_t,
      w.mask_t);
  check_launch(kernel_name<T>("row_norms_kernel") + " (text)");
}

template <typename T>
void forward_t(const LogitsShape& s, const Strided& x, const Strided& text, const float* scale,
               const Strided& out, float* workspace, cudaStream_t stream) {
  const int64_t rows = s.B * s.N;
  const Workspace w(workspace, rows, s.C, s.E);
  norms<T>(s, x, text, w, stream);
  GemmArgs<T, T> g{};
  g.a = static_cast<const T*>(x.data), g.a_row = Index{s.N, x.stride[0], x.stride[1]}, g.a_col = plain(x.stride[2]);
  g.b = static_cast<const T*>(text.data), g.b_row = plain(text.stride[1]), g.b_col = plain(text.stride[0]);
  g.mscale = w.inv_x, g.nscale = w.inv_t, g.sscale = scale;
  g.out = static_cast<T*>(out.data), g.o_row = Index{s.N, out.stride[0], out.stride[1]}, g.o_col = out.stride[2];
  g.M = rows, g.N = s.C, g.K = s.E;
  launch_gemm(g, "x text^T", stream);
}

template <typename T>
void backward_t(const LogitsShape& s, const Strided& dout, const Strided& x, const Strided& text,
                const float* scale, const Strided& dx, const Strided& dtext, float* dscale,
                float* workspace, cudaStream_t stream) {
  const int64_t rows = s.B * s.N;
  const Workspace w(workspace, rows, s.C, s.E);
  norms<T>(s, x, text, w, stream);
  const Index x_row{s.N, x.stride[0], x.stride[1]}, g_row{s.N, dout.stride[0], dout.stride[1]};

  GemmArgs<T, float> y{};  // y = dout normalize(text): [rows, E]
  y.a = static_cast<const T*>(dout.data), y.a_row = g_row, y.a_col = plain(dout.stride[2]);
  y.b = static_cast<const T*>(text.data), y.b_row = plain(text.stride[0]), y.b_col = plain(text.stride[1]);
  y.kscale = w.inv_t;
  y.out = w.y, y.o_row = plain(s.E), y.o_col = 1;
  y.M = rows, y.N = s.E, y.K = s.C;
  launch_gemm(y, "dout text_hat", stream);

  GemmArgs<T, float> z{};  // z = dout^T normalize(x): [C, E], summed over all rows in order
  z.a = static_cast<const T*>(dout.data), z.a_row = plain(dout.stride[2]), z.a_col = g_row;
  z.b = static_cast<const T*>(x.data), z.b_row = x_row, z.b_col = plain(x.stride[2]);
  z.kscale = w.inv_x;
  z.out = w.z, z.o_row = plain(s.E), z.o_col = 1;
  z.M = s.C, z.N = s.E, z.K = rows;
  launch_gemm(z, "dout^T x_hat", stream);

  project_rows_kernel<T><<<row_blocks(rows), kRowThreads, 0, stream>>>(
      w.y, s.E, static_cast<const T*>(x.data), x_row, x.stride[2], w.inv_x, w.mask_x, scale,
      static_cast<T*>(dx.data), Index{s.N, dx.stride[0], dx.stride[1]}, dx.stride[2], w.dots, rows);
  check_launch(kernel_name<T>("project_rows_kernel") + " (dx)");
  project_rows_kernel<T><<<row_blocks(s.C), kRowThreads, 0, stream>>>(
      w.z, s.E, static_cast<const T*>(text.data), plain(text.stride[0]), text.stride[1], w.inv_t,
      w.mask_t, scale, static_cast<T*>(dtext.data), plain(dtext.stride[0]), dtext.stride[1],
      nullptr, s.C);
  check_launch(kernel_name<T>("project_rows_kernel") + " (dtext)");
  sum_kernel<<<1, kSumThreads, 0, stream>>>(w.dots, rows, dscale);
  check_launch("sum_kernel (dlogit_scale)");
}

}  // namespace

int64_t patch_text_logits_workspace(int64_t rows, int64_t classes, int64_t dim, bool backward) {
  return 2 * rows + 2 * classes + (backward ? rows * dim + classes * dim + rows : 0);
}

void patch_text_logits_forward(DType dtype, const LogitsShape& s, Strided x, Strided text,
                               const float* logit_scale, Strided out, float* workspace, int device,
                               std::uintptr_t stream) {
  DeviceGuard guard(device);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::float16: forward_t<__half>(s, x, text, logit_scale, out, workspace, st); break;
    case DType::bfloat16: forward_t<__nv_bfloat16>(s, x, text, logit_scale, out, workspace, st); break;
    case DType::float32: forward_t<float>(s, x, text, logit_scale, out, workspace, st); break;
  }
}

void patch_text_logits_backward(DType dtype, const LogitsShape& s, Strided dout, Strided x,
                                Strided text, const float* logit_scale, Strided dx, Strided dtext,
                                float* dlogit_scale, float* workspace, int device,
                                std::uintptr_t stream) {
  DeviceGuard guard(device);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::float16:
      backward_t<__half>(s, dout, x, text, logit_scale, dx, dtext, dlogit_scale, workspace, st);
      break;
    case DType::bfloat16:
      backward_t<__nv_bfloat16>(s, dout, x, text, logit_scale, dx, dtext, dlogit_scale, workspace, st);
      break;
    case DType::float32:
      backward_t<float>(s, dout, x, text, logit_scale, dx, dtext, dlogit_scale, workspace, st);
      break;
  }
}

}  // namespace armfast::cuda
