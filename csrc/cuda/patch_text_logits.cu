// Cosine patch-text logits on CUDA: out = s * normalize(x) normalize(text)^T and its backward,
// float16 / bfloat16 / float32 with fp32 accumulation, strided inputs, deterministic.
//
// x [B, N, E] is handled as B*N rows. Kernels:
//   row_norms     one warp per row: 1 / max(|row|, eps) and the mask [|row| >= eps]
//   gemm          out[m, n] = epilogue(sum_k A(m, k) B(k, n) kscale[k]) (logits_gemm.cuh): tensor
//                 cores for float16 / bfloat16, and float32 when TF32 is allowed; exact FP32 FMA
//                 otherwise. z's reduction over all B*N rows is split over blocks (split-K) and
//                 summed in a fixed order by a second pass
//   project_rows  grad = s * inv * (y - mask * y_hat <y, y_hat>): the normalisation's backward
//   sum           dlogit_scale = sum of the per-row <y, x_hat> in a fixed order
// Backward (math as armfast/ops/_reference.py): y = dout normalize(text), z = dout^T normalize(x);
// dx, dtext come from project_rows, dlogit_scale = sum_rows <y, x_hat>.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "armfast/cuda_utils.cuh"
#include "kernels.h"
#include "logits_gemm.cuh"

namespace armfast::cuda {
namespace {

using logits::GemmArgs;
using logits::Index;
using logits::plain;

constexpr float kNormEps = 1e-12f;  // as torch.nn.functional.normalize

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

// Splits of the reduction over K = B*N rows in z = dout^T x_hat: about 1024 rows each, so a
// [C, E] output of few tiles still fills the GPU. A function of the shape only, so the summation
// order (and the result) is the same on every GPU.
int64_t row_splits(int64_t rows) { return std::min<int64_t>(64, std::max<int64_t>(1, ceil_div(rows, 1024))); }

// Launches out = epilogue(A B) on tensor cores (`tensor_cores`; A staged [m][k] when A_MK, B [n][k]
// when B_NK, see logits_gemm.cuh) or with FP32 FMA (float32 only), over `splits` K-splits.
template <bool A_MK, bool B_NK, typename TIn, typename TOut>
void launch_gemm(GemmArgs<TIn, TOut> g, int64_t splits, bool tensor_cores, const char* what, cudaStream_t stream) {
  g.k_split = logits::k_per_split(g.K, splits);
  splits = ceil_div(g.K, g.k_split);
  const int64_t gm = ceil_div(g.M, 64), gn = ceil_div(g.N, 64);
  if (gm > 0x7fffffffLL || gn > 65535)
    throw std::invalid_argument(std::string("armfast CUDA patch_text_logits: ") + what + " is too large");
  const dim3 grid(static_cast<unsigned>(gm), static_cast<unsigned>(gn), static_cast<unsigned>(splits));
  if (tensor_cores) {
    logits::set_vector_loads<A_MK, B_NK>(g);
    using C = logits::TcGemm<TIn, A_MK, B_NK>;
    logits::gemm_tc_kernel<TIn, TOut, A_MK, B_NK><<<grid, C::THREADS, C::SMEM, stream>>>(g);
    check_launch(kernel_name<TIn>("gemm_tc_kernel") + " (" + what + ")");
  } else if constexpr (std::is_same_v<TIn, float>) {
    logits::gemm_fma_kernel<TIn, TOut><<<grid, logits::kGemmThreads, 0, stream>>>(g);
    check_launch(kernel_name<TIn>("gemm_fma_kernel") + " (" + what + ")");
  } else {
    throw std::logic_error("patch_text_logits: 16-bit inputs run on tensor cores");
  }
  if (splits > 1) {
    logits::splitk_reduce_kernel<TIn, TOut><<<static_cast<unsigned>(ceil_div(g.M * g.N, 256)), 256, 0, stream>>>(
        g, static_cast<int>(splits));
    check_launch(kernel_name<TIn>("splitk_reduce_kernel") + " (" + what + ")");
  }
}

// Carves the float32 workspace: [rx_inv, rx_mask] (rows), [rt_inv, rt_mask] (classes), then for
// the backward y [rows, E], z [classes, E], dots [rows], z's split-K partial sums [splits, C, E].
struct Workspace {
  float *inv_x, *mask_x, *inv_t, *mask_t, *y, *z, *dots, *partial;
  Workspace(float* w, int64_t rows, int64_t classes, int64_t dim) {
    inv_x = w, mask_x = inv_x + rows, inv_t = mask_x + rows, mask_t = inv_t + classes;
    y = mask_t + classes, z = y + rows * dim, dots = z + classes * dim, partial = dots + rows;
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
               const Strided& out, float* workspace, bool tensor_cores, cudaStream_t stream) {
  const int64_t rows = s.B * s.N;
  const Workspace w(workspace, rows, s.C, s.E);
  norms<T>(s, x, text, w, stream);
  GemmArgs<T, T> g{};
  g.a = static_cast<const T*>(x.data), g.a_row = Index{s.N, x.stride[0], x.stride[1]}, g.a_col = plain(x.stride[2]);
  g.b = static_cast<const T*>(text.data), g.b_row = plain(text.stride[1]), g.b_col = plain(text.stride[0]);
  g.mscale = w.inv_x, g.nscale = w.inv_t, g.sscale = scale;
  g.out = static_cast<T*>(out.data), g.o_row = Index{s.N, out.stride[0], out.stride[1]}, g.o_col = out.stride[2];
  g.M = rows, g.N = s.C, g.K = s.E;
  launch_gemm<true, true>(g, 1, tensor_cores, "x text^T", stream);
}

template <typename T>
void backward_t(const LogitsShape& s, const Strided& dout, const Strided& x, const Strided& text,
                const float* scale, const Strided& dx, const Strided& dtext, float* dscale,
                float* workspace, bool tensor_cores, cudaStream_t stream) {
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
  launch_gemm<true, false>(y, 1, tensor_cores, "dout text_hat", stream);

  project_rows_kernel<T><<<row_blocks(rows), kRowThreads, 0, stream>>>(
      w.y, s.E, static_cast<const T*>(x.data), x_row, x.stride[2], w.inv_x, w.mask_x, scale,
      static_cast<T*>(dx.data), Index{s.N, dx.stride[0], dx.stride[1]}, dx.stride[2], w.dots, rows);
  check_launch(kernel_name<T>("project_rows_kernel") + " (dx)");

  if (dtext.data != nullptr) {  // null: frozen class embeddings, no dtext (a third of the work)
    GemmArgs<T, float> z{};  // z = dout^T normalize(x): [C, E], summed over all rows in order
    z.a = static_cast<const T*>(dout.data), z.a_row = plain(dout.stride[2]), z.a_col = g_row;
    z.b = static_cast<const T*>(x.data), z.b_row = x_row, z.b_col = plain(x.stride[2]);
    z.kscale = w.inv_x;
    z.out = w.z, z.o_row = plain(s.E), z.o_col = 1;
    z.M = s.C, z.N = s.E, z.K = rows;
    z.partial = w.partial;
    launch_gemm<false, false>(z, row_splits(rows), tensor_cores, "dout^T x_hat", stream);
    project_rows_kernel<T><<<row_blocks(s.C), kRowThreads, 0, stream>>>(
        w.z, s.E, static_cast<const T*>(text.data), plain(text.stride[0]), text.stride[1], w.inv_t,
        w.mask_t, scale, static_cast<T*>(dtext.data), plain(dtext.stride[0]), dtext.stride[1],
        nullptr, s.C);
    check_launch(kernel_name<T>("project_rows_kernel") + " (dtext)");
  }
  sum_kernel<<<1, kSumThreads, 0, stream>>>(w.dots, rows, dscale);
  check_launch("sum_kernel (dlogit_scale)");
}

}  // namespace

int64_t patch_text_logits_workspace(int64_t rows, int64_t classes, int64_t dim, bool backward) {
  return 2 * rows + 2 * classes +
         (backward ? rows * dim + classes * dim + rows + (row_splits(rows) > 1 ? row_splits(rows) * classes * dim : 0) : 0);
}

void patch_text_logits_forward(DType dtype, const LogitsShape& s, Strided x, Strided text,
                               const float* logit_scale, Strided out, float* workspace, bool allow_tf32,
                               int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::float16: forward_t<__half>(s, x, text, logit_scale, out, workspace, true, st); break;
    case DType::bfloat16: forward_t<__nv_bfloat16>(s, x, text, logit_scale, out, workspace, true, st); break;
    case DType::float32: forward_t<float>(s, x, text, logit_scale, out, workspace, allow_tf32, st); break;
  }
}

void patch_text_logits_backward(DType dtype, const LogitsShape& s, Strided dout, Strided x,
                                Strided text, const float* logit_scale, Strided dx, Strided dtext,
                                float* dlogit_scale, float* workspace, bool allow_tf32, int device,
                                std::uintptr_t stream) {
  DeviceGuard guard(device);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::float16:
      backward_t<__half>(s, dout, x, text, logit_scale, dx, dtext, dlogit_scale, workspace, true, st);
      break;
    case DType::bfloat16:
      backward_t<__nv_bfloat16>(s, dout, x, text, logit_scale, dx, dtext, dlogit_scale, workspace, true, st);
      break;
    case DType::float32:
      backward_t<float>(s, dout, x, text, logit_scale, dx, dtext, dlogit_scale, workspace, allow_tf32, st);
      break;
  }
}

}  // namespace armfast::cuda
