// Python bindings of the CUDA kernels (armfast._C_cuda). No libtorch: tensors arrive as data
// pointers with sizes and strides plus torch's current stream handle and the device index.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "armfast/tensor_arg.h"
#include "kernels.h"

namespace py = pybind11;
using armfast::PyTensor;
using armfast::TensorArg;
using armfast::tensor_arg;
namespace cu = armfast::cuda;

namespace {

cu::DType parse_dtype(const std::string& dtype) {
  if (dtype == "float16") return cu::DType::float16;
  if (dtype == "bfloat16") return cu::DType::bfloat16;
  if (dtype == "float32") return cu::DType::float32;
  throw py::type_error("armfast._C_cuda kernels take float16, bfloat16 or float32, got " + dtype);
}

cu::Strided strided(const TensorArg& a) {
  cu::Strided s{reinterpret_cast<void*>(a.ptr), {0, 0, 0, 0}};
  for (size_t i = 0; i < a.strides.size(); ++i) s.stride[i] = a.strides[i];
  return s;
}

// Buffers the kernels index as flat arrays must be contiguous.
void require_contiguous(const char* name, const TensorArg& a) {
  int64_t expected = 1;
  for (size_t i = a.sizes.size(); i-- > 0;) {
    if (a.sizes[i] != 1 && a.strides[i] != expected)
      throw std::invalid_argument(std::string(name) + " must be contiguous, got strides " +
                                  armfast::shape_str(a.strides));
    expected *= a.sizes[i];
  }
}

void check_scale(double scale) {
  if (!std::isfinite(scale) || scale <= 0)
    throw std::invalid_argument("scale must be finite and > 0, got " + std::to_string(scale));
}

void check_device(int device) {
  if (device < 0) throw std::invalid_argument("device must be a CUDA device index, got " + std::to_string(device));
}

void check_head_dim(int64_t d) {
  if (d != 32 && d != 64 && d != 128)
    throw std::invalid_argument("armfast CUDA attention supports head dims 32, 64, 128; got d=" + std::to_string(d));
}

void attention_forward(const std::string& dtype, const PyTensor& q, const PyTensor& k,
                       const PyTensor& v, const PyTensor& out, const PyTensor& lse, double scale,
                       bool allow_tf32, int device, std::uintptr_t stream) {
  const cu::DType dt = parse_dtype(dtype);
  const TensorArg qa = tensor_arg("q", q, {-1, -1, -1, -1});
  const int64_t B = qa.size(0), H = qa.size(1), Nq = qa.size(2), d = qa.size(3);
  const TensorArg ka = tensor_arg("k", k, {B, H, -1, d});
  const int64_t Nk = ka.size(2);
  const TensorArg va = tensor_arg("v", v, {B, H, Nk, d});
  const TensorArg oa = tensor_arg("out", out, {B, H, Nq, d});
  const TensorArg la = tensor_arg("lse", lse, {B, H, Nq});
  check_head_dim(d);
  check_scale(scale);
  check_device(device);
  py::gil_scoped_release release;
  cu::attention_forward(dt, {B, H, Nq, Nk, d}, strided(qa), strided(ka), strided(va), strided(oa),
                        strided(la), static_cast<float>(scale), allow_tf32, device, stream);
}

void attention_backward(const std::string& dtype, const PyTensor& dout, const PyTensor& q,
                        const PyTensor& k, const PyTensor& v, const PyTensor& out,
                        const PyTensor& lse, const PyTensor& workspace, const PyTensor& dq,
                        const PyTensor& dk, const PyTensor& dv, double scale, bool allow_tf32,
                        bool deterministic, int device, std::uintptr_t stream) {
  const cu::DType dt = parse_dtype(dtype);
  const TensorArg qa = tensor_arg("q", q, {-1, -1, -1, -1});
  const int64_t B = qa.size(0), H = qa.size(1), Nq = qa.size(2), d = qa.size(3);
  const TensorArg ka = tensor_arg("k", k, {B, H, -1, d});
  const int64_t Nk = ka.size(2);
  const TensorArg va = tensor_arg("v", v, {B, H, Nk, d});
  const TensorArg ga = tensor_arg("dout", dout, {B, H, Nq, d});
  const TensorArg oa = tensor_arg("out", out, {B, H, Nq, d});
  const TensorArg la = tensor_arg("lse", lse, {B, H, Nq});
  const TensorArg wa = tensor_arg("workspace", workspace, {-1});
  require_contiguous("workspace", wa);
  const TensorArg dqa = tensor_arg("dq", dq, {B, H, Nq, d});
  const TensorArg dka = tensor_arg("dk", dk, {B, H, Nk, d});
  const TensorArg dva = tensor_arg("dv", dv, {B, H, Nk, d});
  check_head_dim(d);
  check_scale(scale);
  check_device(device);
  py::gil_scoped_release release;
  cu::attention_backward(dt, {B, H, Nq, Nk, d}, strided(ga), strided(qa), strided(ka), strided(va),
                         strided(oa), strided(la), wa.data<float>(), wa.size(0), strided(dqa),
                         strided(dka), strided(dva), static_cast<float>(scale), allow_tf32,
                         deterministic, device, stream);
}

void patch_text_logits_forward(const std::string& dtype, const PyTensor& x, const PyTensor& text,
                               const PyTensor& logit_scale, const PyTensor& out,
                               const PyTensor& workspace, bool allow_tf32, int device,
                               std::uintptr_t stream) {
  const cu::DType dt = parse_dtype(dtype);
  const TensorArg xa = tensor_arg("x", x, {-1, -1, -1});
  const int64_t B = xa.size(0), N = xa.size(1), E = xa.size(2);
  const TensorArg ta = tensor_arg("text", text, {-1, E});
  const int64_t C = ta.size(0);
  const TensorArg sa = tensor_arg("logit_scale", logit_scale, {1});
  const TensorArg oa = tensor_arg("out", out, {B, N, C});
  const TensorArg wa = tensor_arg("workspace", workspace, {cu::patch_text_logits_workspace(B * N, C, E, false)});
  require_contiguous("workspace", wa);
  check_device(device);
  py::gil_scoped_release release;
  cu::patch_text_logits_forward(dt, {B, N, C, E}, strided(xa), strided(ta), sa.data<const float>(),
                                strided(oa), wa.data<float>(), allow_tf32, device, stream);
}

void patch_text_logits_backward(const std::string& dtype, const PyTensor& dout, const PyTensor& x,
                                const PyTensor& text, const PyTensor& logit_scale,
                                const PyTensor& dx, const std::optional<PyTensor>& dtext,
                                const PyTensor& dlogit_scale, const PyTensor& workspace,
                                bool allow_tf32, int device, std::uintptr_t stream) {
  const cu::DType dt = parse_dtype(dtype);
  const TensorArg xa = tensor_arg("x", x, {-1, -1, -1});
  const int64_t B = xa.size(0), N = xa.size(1), E = xa.size(2);
  const TensorArg ta = tensor_arg("text", text, {-1, E});
  const int64_t C = ta.size(0);
  const TensorArg ga = tensor_arg("dout", dout, {B, N, C});
  const TensorArg sa = tensor_arg("logit_scale", logit_scale, {1});
  const TensorArg dxa = tensor_arg("dx", dx, {B, N, E});
  // dtext None: its gradient is not needed and its pass is skipped (null data pointer)
  const std::optional<TensorArg> dta =
      dtext ? std::optional<TensorArg>(tensor_arg("dtext", *dtext, {C, E})) : std::nullopt;
  const TensorArg dsa = tensor_arg("dlogit_scale", dlogit_scale, {1});
  const TensorArg wa = tensor_arg("workspace", workspace, {cu::patch_text_logits_workspace(B * N, C, E, true)});
  require_contiguous("workspace", wa);
  check_device(device);
  py::gil_scoped_release release;
  cu::patch_text_logits_backward(dt, {B, N, C, E}, strided(ga), strided(xa), strided(ta),
                                 sa.data<const float>(), strided(dxa),
                                 dta ? strided(*dta) : cu::Strided{nullptr, {0, 0, 0, 0}},
                                 dsa.data<float>(), wa.data<float>(), allow_tf32, device, stream);
}

// x, v, out [B,H,N,d]; x2: SCLIP's second operand or None; grid: NACLIP's (h, w, class_token,
// sigma) or None.
void self_correlation_forward(const std::string& dtype, const PyTensor& x, const std::optional<PyTensor>& x2,
                              const PyTensor& v, const PyTensor& out, double scale,
                              const std::optional<std::tuple<int64_t, int64_t, bool, double>>& grid,
                              bool allow_tf32, int device, std::uintptr_t stream) {
  const cu::DType dt = parse_dtype(dtype);
  const TensorArg xa = tensor_arg("x", x, {-1, -1, -1, -1});
  const std::vector<int64_t> shape = xa.sizes;
  const std::optional<TensorArg> x2a = x2 ? std::optional<TensorArg>(tensor_arg("x2", *x2, shape)) : std::nullopt;
  const TensorArg va = tensor_arg("v", v, shape);
  const TensorArg oa = tensor_arg("out", out, shape);
  check_head_dim(shape[3]);
  check_scale(scale);
  check_device(device);
  const cu::SelfCorrelationShape s{shape[0], shape[1], shape[2], shape[3]};
  std::optional<cu::GridBias> bias;
  if (grid) {
    if (x2) throw std::invalid_argument("grid: the Gaussian bias takes one operand, got x2 too");
    const auto [h, w, class_token, sigma] = *grid;
    if (h < 1 || w < 1 || h * w + (class_token ? 1 : 0) != s.N)
      throw std::invalid_argument("grid (" + std::to_string(h) + ", " + std::to_string(w) + ") does not match N=" +
                                  std::to_string(s.N) + " tokens");
    if (!std::isfinite(sigma) || sigma <= 0)
      throw std::invalid_argument("sigma must be finite and > 0, got " + std::to_string(sigma));
    bias = cu::GridBias{h, w, class_token, sigma};
  }
  const cu::Strided none{nullptr, {0, 0, 0, 0}};
  py::gil_scoped_release release;
  cu::self_correlation_forward(dt, s, strided(xa), x2a ? strided(*x2a) : none, strided(va), strided(oa),
                               static_cast<float>(scale), bias ? &*bias : nullptr, allow_tf32, device, stream);
}

void masked_affinity_forward(const std::string& dtype, const PyTensor& f, const PyTensor& rnorm,
                             const PyTensor& thresh, const PyTensor& v, const PyTensor& out, double gamma,
                             const PyTensor& workspace, bool allow_tf32, int device, std::uintptr_t stream) {
  const cu::DType dt = parse_dtype(dtype);
  const TensorArg fa = tensor_arg("f", f, {-1, -1, -1});
  const int64_t B = fa.size(0), n = fa.size(1), C = fa.size(2);
  const TensorArg ra = tensor_arg("rnorm", rnorm, {B, n});
  const TensorArg ta = tensor_arg("thresh", thresh, {B});
  require_contiguous("rnorm", ra);
  require_contiguous("thresh", ta);
  const TensorArg va = tensor_arg("v", v, {B, -1, n, -1});
  const int64_t H = va.size(1), d = va.size(3);
  const TensorArg oa = tensor_arg("out", out, {B, H, n, d});
  const TensorArg wa = tensor_arg("workspace", workspace, {-1});
  require_contiguous("workspace", wa);
  if (!std::isfinite(gamma) || gamma <= 0)
    throw std::invalid_argument("gamma must be finite and > 0, got " + std::to_string(gamma));
  check_device(device);
  py::gil_scoped_release release;
  cu::masked_affinity_forward(dt, {B, n, C, H, d}, strided(fa), ra.data<const float>(), ta.data<const float>(),
                              strided(va), strided(oa), static_cast<float>(gamma),
                              wa.size(0) ? wa.data<float>() : nullptr, wa.size(0), allow_tf32, device, stream);
}

// f [B,N,C]; rnorm [B,N] (float32, contiguous); x, out [B,N,D]; rowsum [B,N] (float32, contiguous).
void similarity_aggregation_forward(const std::string& dtype, const PyTensor& f, const PyTensor& rnorm,
                                    const PyTensor& x, const PyTensor& out, const PyTensor& rowsum, double threshold,
                                    bool allow_tf32, int device, std::uintptr_t stream) {
  const cu::DType dt = parse_dtype(dtype);
  const TensorArg fa = tensor_arg("f", f, {-1, -1, -1});
  const int64_t B = fa.size(0), N = fa.size(1), C = fa.size(2);
  const TensorArg ra = tensor_arg("rnorm", rnorm, {B, N});
  const TensorArg xa = tensor_arg("x", x, {B, N, -1});
  const int64_t D = xa.size(2);
  const TensorArg oa = tensor_arg("out", out, {B, N, D});
  const TensorArg sa = tensor_arg("rowsum", rowsum, {B, N});
  require_contiguous("rnorm", ra);
  require_contiguous("rowsum", sa);
  if (!std::isfinite(threshold))
    throw std::invalid_argument("threshold must be finite, got " + std::to_string(threshold));
  check_device(device);
  py::gil_scoped_release release;
  cu::similarity_aggregation_forward(dt, {B, N, C, D}, strided(fa), ra.data<const float>(), strided(xa), strided(oa),
                                     sa.data<float>(), static_cast<float>(threshold), allow_tf32, device, stream);
}

// f [B,N,C]; rnorm [B,N], thresh [B] (float32, contiguous); k, v, out [B,H,N,d]; lse_mask, lse_kk
// [B,H,N] (float32, contiguous).
void averaged_dual_softmax_forward(const std::string& dtype, const PyTensor& f, const PyTensor& rnorm,
                                   const PyTensor& thresh, const PyTensor& k, const PyTensor& v, const PyTensor& out,
                                   const PyTensor& lse_mask, const PyTensor& lse_kk, double scale, double gamma,
                                   bool allow_tf32, int device, std::uintptr_t stream) {
  const cu::DType dt = parse_dtype(dtype);
  const TensorArg fa = tensor_arg("f", f, {-1, -1, -1});
  const int64_t B = fa.size(0), N = fa.size(1), C = fa.size(2);
  const TensorArg ra = tensor_arg("rnorm", rnorm, {B, N});
  const TensorArg ta = tensor_arg("thresh", thresh, {B});
  const TensorArg ka = tensor_arg("k", k, {B, -1, N, -1});
  const int64_t H = ka.size(1), d = ka.size(3);
  const TensorArg va = tensor_arg("v", v, {B, H, N, d});
  const TensorArg oa = tensor_arg("out", out, {B, H, N, d});
  const TensorArg lma = tensor_arg("lse_mask", lse_mask, {B, H, N});
  const TensorArg lka = tensor_arg("lse_kk", lse_kk, {B, H, N});
  require_contiguous("rnorm", ra);
  require_contiguous("thresh", ta);
  require_contiguous("lse_mask", lma);
  require_contiguous("lse_kk", lka);
  check_head_dim(d);
  check_scale(scale);
  if (!std::isfinite(gamma) || gamma <= 0)
    throw std::invalid_argument("gamma must be finite and > 0, got " + std::to_string(gamma));
  check_device(device);
  py::gil_scoped_release release;
  cu::averaged_dual_softmax_forward(dt, {B, N, C, H, d}, strided(fa), ra.data<const float>(), ta.data<const float>(),
                                    strided(ka), strided(va), strided(oa), lma.data<float>(), lka.data<float>(),
                                    static_cast<float>(scale), static_cast<float>(gamma), allow_tf32, device, stream);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "armfast CUDA kernels";
  m.def("device_count", &cu::cuda_device_count,
        "Number of CUDA devices; raises RuntimeError when the driver cannot be used.");
  m.def("build_info", [] {
    py::dict info;
    info["cuda_archs"] = ARMFAST_CUDA_ARCHS;
    info["cuda_runtime"] = CUDART_VERSION;
    return info;
  });
  const std::string tensors =
      " Tensors are (data_ptr, sizes, strides) tuples, strides in elements; `stream` is a "
      "cudaStream_t handle (torch.cuda.current_stream().cuda_stream) on `device`.";
  m.def("attention_forward", &attention_forward, py::arg("dtype"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("allow_tf32"),
        py::arg("device"), py::arg("stream"),
        ("Flash attention forward: writes out [B,H,Nq,d] and lse [B,H,Nq] (float32) through their "
         "strides; float32 uses TF32 tensor cores only with allow_tf32." + tensors).c_str());
  m.def("attention_backward_workspace",
        [](int64_t B, int64_t H, int64_t Nq, int64_t d, bool atomic_dq) {
          return cu::attention_backward_workspace({B, H, Nq, Nq, d}, atomic_dq);
        },
        py::arg("B"), py::arg("H"), py::arg("Nq"), py::arg("d"), py::arg("atomic_dq"),
        "float32 elements of attention_backward's workspace; atomic_dq: not deterministic, and "
        "float16/bfloat16 or float32 with TF32.");
  m.def("attention_backward", &attention_backward, py::arg("dtype"), py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("workspace"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("scale"), py::arg("allow_tf32"),
        py::arg("deterministic"), py::arg("device"), py::arg("stream"),
        ("Flash attention backward: writes dq, dk, dv; workspace: a contiguous float32 tensor of "
         "attention_backward_workspace(...) elements; deterministic: bitwise reproducible "
         "gradients (no atomics)." + tensors).c_str());
  m.def("patch_text_logits_workspace", &cu::patch_text_logits_workspace, py::arg("rows"),
        py::arg("classes"), py::arg("dim"), py::arg("backward"),
        "float32 elements of workspace patch_text_logits_forward/backward need (rows = B*N).");
  m.def("patch_text_logits_forward", &patch_text_logits_forward, py::arg("dtype"), py::arg("x"),
        py::arg("text"), py::arg("logit_scale"), py::arg("out"), py::arg("workspace"),
        py::arg("allow_tf32"), py::arg("device"), py::arg("stream"),
        ("out [B,N,C] = logit_scale * normalize(x) normalize(text)^T; logit_scale is a float32 "
         "[1] tensor on the device." + tensors).c_str());
  m.def("patch_text_logits_backward", &patch_text_logits_backward, py::arg("dtype"),
        py::arg("dout"), py::arg("x"), py::arg("text"), py::arg("logit_scale"), py::arg("dx"),
        py::arg("dtext"), py::arg("dlogit_scale"), py::arg("workspace"), py::arg("allow_tf32"),
        py::arg("device"), py::arg("stream"),
        ("Writes dx, dtext (None: skipped) and dlogit_scale (float32 [1])." + tensors).c_str());
  m.def("self_correlation_forward", &self_correlation_forward, py::arg("dtype"), py::arg("x"), py::arg("x2"),
        py::arg("v"), py::arg("out"), py::arg("scale"), py::arg("grid"), py::arg("allow_tf32"), py::arg("device"),
        py::arg("stream"),
        ("out [B,H,N,d] = softmax(scale x x^T + G) v, G of grid=(h, w, class_token, sigma) or none; with x2, "
         "(softmax(scale x x^T) + softmax(scale x2 x2^T)) v. float32 needs allow_tf32." + tensors).c_str());
  m.def("masked_affinity_workspace",
        [](int64_t B, int64_t n, int64_t C, int64_t H, int64_t d, int device) {
          return cu::masked_affinity_workspace({B, n, C, H, d}, device);
        },
        py::arg("B"), py::arg("n"), py::arg("C"), py::arg("H"), py::arg("d"), py::arg("device"),
        "float32 elements of masked_affinity_forward's workspace on `device` (0: none needed).");
  m.def("masked_affinity_forward", &masked_affinity_forward, py::arg("dtype"), py::arg("f"), py::arg("rnorm"),
        py::arg("thresh"), py::arg("v"), py::arg("out"), py::arg("gamma"), py::arg("workspace"),
        py::arg("allow_tf32"), py::arg("device"), py::arg("stream"),
        ("out [B,H,n,d] = softmax(gamma S, S < thresh masked off the diagonal) v, S the cosines of the rows "
         "of f [B,n,C]; rnorm [B,n] and thresh [B]: float32 from the first pass; workspace: "
         "masked_affinity_workspace(...) float32 elements. float32 needs allow_tf32." +
         tensors).c_str());
  m.def("similarity_aggregation_forward", &similarity_aggregation_forward, py::arg("dtype"), py::arg("f"),
        py::arg("rnorm"), py::arg("x"), py::arg("out"), py::arg("rowsum"), py::arg("threshold"),
        py::arg("allow_tf32"), py::arg("device"), py::arg("stream"),
        ("out [B,N,D] = W x / (rowsum(W) + 1e-6), W = S [S >= threshold], S the cosines of the rows of f [B,N,C]; "
         "rnorm [B,N]: float32 from the first pass; writes rowsum [B,N] (float32). float32 needs allow_tf32." +
         tensors).c_str());
  m.def("averaged_dual_softmax_forward", &averaged_dual_softmax_forward, py::arg("dtype"), py::arg("f"),
        py::arg("rnorm"), py::arg("thresh"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse_mask"),
        py::arg("lse_kk"), py::arg("scale"), py::arg("gamma"), py::arg("allow_tf32"), py::arg("device"),
        py::arg("stream"),
        ("out [B,H,N,d] = ((softmax(gamma (S - thresh), < 0 masked off the diagonal) + softmax(scale k k^T)) / 2) v; "
         "rnorm [B,N] and thresh [B] = beta mean(S): float32 from the first pass; writes both row lse [B,H,N] "
         "(float32). float32 needs allow_tf32." + tensors).c_str());
}
