// Python bindings of the CPU kernels (armfast._C). No libtorch: tensors arrive as data
// pointers with sizes and strides; armfast/ops/_extension.py validates and allocates.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "armfast/tensor_arg.h"
#include "kernels.h"
#include "similarity.h"

namespace py = pybind11;
using armfast::PyTensor;
using armfast::TensorArg;
using armfast::tensor_arg;
namespace cpu = armfast::cpu;

namespace {

template <typename T>
cpu::Strided<T> strided(const TensorArg& a) {
  cpu::Strided<T> s{a.data<T>(), {0, 0, 0, 0}};
  for (size_t i = 0; i < a.strides.size(); ++i) s.stride[i] = a.strides[i];
  return s;
}

// "float32" -> false, "float64" -> true; anything else is a TypeError.
bool is_double(const std::string& dtype) {
  if (dtype == "float32") return false;
  if (dtype == "float64") return true;
  throw py::type_error("armfast._C kernels take float32 or float64, got " + dtype);
}

void check_scale(const char* name, double value, bool positive) {
  if (!std::isfinite(value) || (positive && value <= 0))
    throw std::invalid_argument(std::string(name) + " must be finite" + (positive ? " and > 0" : "") +
                                ", got " + std::to_string(value));
}

void attention_forward(const std::string& dtype, const PyTensor& q, const PyTensor& k,
                       const PyTensor& v, const PyTensor& out, const PyTensor& lse, double scale,
                       int threads) {
  const bool f64 = is_double(dtype);
  const TensorArg qa = tensor_arg("q", q, {-1, -1, -1, -1});
  const int64_t B = qa.size(0), H = qa.size(1), Nq = qa.size(2), d = qa.size(3);
  const TensorArg ka = tensor_arg("k", k, {B, H, -1, d});
  const int64_t Nk = ka.size(2);
  const TensorArg va = tensor_arg("v", v, {B, H, Nk, d});
  const TensorArg oa = tensor_arg("out", out, {B, H, Nq, d});
  const TensorArg la = tensor_arg("lse", lse, {B, H, Nq});
  check_scale("scale", scale, true);
  const cpu::AttentionShape s{B, H, Nq, Nk, d};
  py::gil_scoped_release release;
  if (f64)
    cpu::attention_forward<double>(s, strided<const double>(qa), strided<const double>(ka),
                                   strided<const double>(va), strided<double>(oa),
                                   strided<double>(la), scale, threads);
  else
    cpu::attention_forward<float>(s, strided<const float>(qa), strided<const float>(ka),
                                  strided<const float>(va), strided<float>(oa), strided<float>(la),
                                  scale, threads);
}

void attention_backward(const std::string& dtype, const PyTensor& dout, const PyTensor& q,
                        const PyTensor& k, const PyTensor& v, const PyTensor& out,
                        const PyTensor& lse, const PyTensor& dq, const PyTensor& dk,
                        const PyTensor& dv, double scale, int threads) {
  const bool f64 = is_double(dtype);
  const TensorArg qa = tensor_arg("q", q, {-1, -1, -1, -1});
  const int64_t B = qa.size(0), H = qa.size(1), Nq = qa.size(2), d = qa.size(3);
  const TensorArg ka = tensor_arg("k", k, {B, H, -1, d});
  const int64_t Nk = ka.size(2);
  const TensorArg va = tensor_arg("v", v, {B, H, Nk, d});
  const TensorArg ga = tensor_arg("dout", dout, {B, H, Nq, d});
  const TensorArg oa = tensor_arg("out", out, {B, H, Nq, d});
  const TensorArg la = tensor_arg("lse", lse, {B, H, Nq});
  const TensorArg dqa = tensor_arg("dq", dq, {B, H, Nq, d});
  const TensorArg dka = tensor_arg("dk", dk, {B, H, Nk, d});
  const TensorArg dva = tensor_arg("dv", dv, {B, H, Nk, d});
  check_scale("scale", scale, true);
  const cpu::AttentionShape s{B, H, Nq, Nk, d};
  py::gil_scoped_release release;
  if (f64)
    cpu::attention_backward<double>(
        s, strided<const double>(ga), strided<const double>(qa), strided<const double>(ka),
        strided<const double>(va), strided<const double>(oa), strided<const double>(la),
        strided<double>(dqa), strided<double>(dka), strided<double>(dva), scale, threads);
  else
    cpu::attention_backward<float>(
        s, strided<const float>(ga), strided<const float>(qa), strided<const float>(ka),
        strided<const float>(va), strided<const float>(oa), strided<const float>(la),
        strided<float>(dqa), strided<float>(dka), strided<float>(dva), scale, threads);
}

void patch_text_logits_forward(const std::string& dtype, const PyTensor& x, const PyTensor& text,
                               const PyTensor& out, double logit_scale, int threads) {
  const bool f64 = is_double(dtype);
  const TensorArg xa = tensor_arg("x", x, {-1, -1, -1});
  const int64_t B = xa.size(0), N = xa.size(1), E = xa.size(2);
  const TensorArg ta = tensor_arg("text", text, {-1, E});
  const int64_t C = ta.size(0);
  const TensorArg oa = tensor_arg("out", out, {B, N, C});
  check_scale("logit_scale", logit_scale, false);
  const cpu::LogitsShape s{B, N, C, E};
  py::gil_scoped_release release;
  if (f64)
    cpu::patch_text_logits_forward<double>(s, strided<const double>(xa), strided<const double>(ta),
                                           strided<double>(oa), logit_scale, threads);
  else
    cpu::patch_text_logits_forward<float>(s, strided<const float>(xa), strided<const float>(ta),
                                          strided<float>(oa), logit_scale, threads);
}

double patch_text_logits_backward(const std::string& dtype, const PyTensor& dout, const PyTensor& x,
                                  const PyTensor& text, double logit_scale, const PyTensor& dx,
                                  const std::optional<PyTensor>& dtext, int threads) {
  const bool f64 = is_double(dtype);
  const TensorArg xa = tensor_arg("x", x, {-1, -1, -1});
  const int64_t B = xa.size(0), N = xa.size(1), E = xa.size(2);
  const TensorArg ta = tensor_arg("text", text, {-1, E});
  const int64_t C = ta.size(0);
  const TensorArg ga = tensor_arg("dout", dout, {B, N, C});
  const TensorArg dxa = tensor_arg("dx", dx, {B, N, E});
  // dtext None: its gradient is not needed and its pass is skipped (null data pointer)
  const std::optional<TensorArg> dta =
      dtext ? std::optional<TensorArg>(tensor_arg("dtext", *dtext, {C, E})) : std::nullopt;
  check_scale("logit_scale", logit_scale, false);
  const cpu::LogitsShape s{B, N, C, E};
  py::gil_scoped_release release;
  if (f64)
    return cpu::patch_text_logits_backward<double>(
        s, strided<const double>(ga), strided<const double>(xa), strided<const double>(ta),
        logit_scale, strided<double>(dxa), dta ? strided<double>(*dta) : cpu::Strided<double>{},
        threads);
  return cpu::patch_text_logits_backward<float>(
      s, strided<const float>(ga), strided<const float>(xa), strided<const float>(ta), logit_scale,
      strided<float>(dxa), dta ? strided<float>(*dta) : cpu::Strided<float>{}, threads);
}

// x, v, out [B,H,N,d]; x2: SCLIP's second operand or None; grid: NACLIP's (h, w, class_token,
// sigma) or None.
void self_correlation_forward(const std::string& dtype, const PyTensor& x,
                              const std::optional<PyTensor>& x2, const PyTensor& v,
                              const PyTensor& out, double scale,
                              const std::optional<std::tuple<int64_t, int64_t, bool, double>>& grid,
                              int threads) {
  const bool f64 = is_double(dtype);
  const TensorArg xa = tensor_arg("x", x, {-1, -1, -1, -1});
  const std::vector<int64_t> shape = xa.sizes;
  const std::optional<TensorArg> x2a =
      x2 ? std::optional<TensorArg>(tensor_arg("x2", *x2, shape)) : std::nullopt;
  const TensorArg va = tensor_arg("v", v, shape);
  const TensorArg oa = tensor_arg("out", out, shape);
  check_scale("scale", scale, true);
  const cpu::SelfCorrelationShape s{shape[0], shape[1], shape[2], shape[3]};
  std::optional<cpu::GridBias> bias;
  if (grid) {
    if (x2) throw std::invalid_argument("grid: the Gaussian bias takes one operand, got x2 too");
    const auto [h, w, class_token, sigma] = *grid;
    if (h < 1 || w < 1 || h * w + (class_token ? 1 : 0) != s.N)
      throw std::invalid_argument("grid (" + std::to_string(h) + ", " + std::to_string(w) +
                                  ") does not match N=" + std::to_string(s.N) + " tokens");
    check_scale("sigma", sigma, true);
    bias = cpu::GridBias{h, w, class_token, sigma};
  }
  const cpu::GridBias* b = bias ? &*bias : nullptr;
  py::gil_scoped_release release;
  if (f64)
    cpu::self_correlation_forward<double>(
        s, strided<const double>(xa), x2a ? strided<const double>(*x2a) : cpu::Strided<const double>{},
        strided<const double>(va), strided<double>(oa), scale, b, threads);
  else
    cpu::self_correlation_forward<float>(
        s, strided<const float>(xa), x2a ? strided<const float>(*x2a) : cpu::Strided<const float>{},
        strided<const float>(va), strided<float>(oa), scale, b, threads);
}

void masked_affinity_forward(const std::string& dtype, const PyTensor& f, const PyTensor& v,
                             const PyTensor& out, double beta, double gamma, int threads) {
  const bool f64 = is_double(dtype);
  const TensorArg fa = tensor_arg("f", f, {-1, -1, -1});
  const int64_t B = fa.size(0), n = fa.size(1), C = fa.size(2);
  const TensorArg va = tensor_arg("v", v, {B, -1, n, -1});
  const int64_t H = va.size(1), d = va.size(3);
  const TensorArg oa = tensor_arg("out", out, {B, H, n, d});
  check_scale("beta", beta, false);
  check_scale("gamma", gamma, true);
  const cpu::AffinityShape s{B, n, C, H, d};
  py::gil_scoped_release release;
  if (f64)
    cpu::masked_affinity_forward<double>(s, strided<const double>(fa), strided<const double>(va),
                                         strided<double>(oa), beta, gamma, threads);
  else
    cpu::masked_affinity_forward<float>(s, strided<const float>(fa), strided<const float>(va),
                                        strided<float>(oa), beta, gamma, threads);
}

// f [B,N,C], x and out [B,N,D].
void similarity_aggregation_forward(const std::string& dtype, const PyTensor& f, const PyTensor& x,
                                    const PyTensor& out, double threshold, int threads) {
  const bool f64 = is_double(dtype);
  const TensorArg fa = tensor_arg("f", f, {-1, -1, -1});
  const int64_t B = fa.size(0), N = fa.size(1), C = fa.size(2);
  const TensorArg xa = tensor_arg("x", x, {B, N, -1});
  const int64_t D = xa.size(2);
  const TensorArg oa = tensor_arg("out", out, {B, N, D});
  check_scale("threshold", threshold, false);
  const cpu::SimilarityShape s{B, N, C, 1, D};
  py::gil_scoped_release release;
  if (f64)
    cpu::similarity_aggregation_forward<double>(s, strided<const double>(fa), strided<const double>(xa),
                                                strided<double>(oa), threshold, threads);
  else
    cpu::similarity_aggregation_forward<float>(s, strided<const float>(fa), strided<const float>(xa),
                                               strided<float>(oa), threshold, threads);
}

// f [B,N,C]; k, v and out [B,H,N,d].
void averaged_dual_softmax_forward(const std::string& dtype, const PyTensor& f, const PyTensor& k,
                                   const PyTensor& v, const PyTensor& out, double scale,
                                   double beta, double gamma, int threads) {
  const bool f64 = is_double(dtype);
  const TensorArg fa = tensor_arg("f", f, {-1, -1, -1});
  const int64_t B = fa.size(0), N = fa.size(1), C = fa.size(2);
  const TensorArg ka = tensor_arg("k", k, {B, -1, N, -1});
  const int64_t H = ka.size(1), d = ka.size(3);
  const TensorArg va = tensor_arg("v", v, {B, H, N, d});
  const TensorArg oa = tensor_arg("out", out, {B, H, N, d});
  check_scale("scale", scale, true);
  check_scale("beta", beta, false);
  check_scale("gamma", gamma, true);
  const cpu::SimilarityShape s{B, N, C, H, d};
  py::gil_scoped_release release;
  if (f64)
    cpu::averaged_dual_softmax_forward<double>(s, strided<const double>(fa), strided<const double>(ka),
                                               strided<const double>(va), strided<double>(oa), scale,
                                               beta, gamma, threads);
  else
    cpu::averaged_dual_softmax_forward<float>(s, strided<const float>(fa), strided<const float>(ka),
                                              strided<const float>(va), strided<float>(oa), scale,
                                              beta, gamma, threads);
}

// The measured FMA peak (peak.cpp) as a dict: flops, seconds, threads, chains, lanes, checksum.
py::dict fma_peak(const std::string& dtype, int64_t iterations, int threads) {
  const bool f64 = is_double(dtype);
  if (iterations < 1)
    throw std::invalid_argument("iterations must be >= 1, got " + std::to_string(iterations));
  cpu::FmaPeak p;
  {
    py::gil_scoped_release release;
    p = f64 ? cpu::fma_peak<double>(iterations, threads) : cpu::fma_peak<float>(iterations, threads);
  }
  py::dict out;
  out["flops"] = p.flops;
  out["seconds"] = p.seconds;
  out["threads"] = p.threads;
  out["chains"] = p.chains;
  out["lanes"] = p.lanes;
  out["checksum"] = p.checksum;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "armfast CPU kernels (C++/OpenMP)";
  m.def("build_info", [] {
    py::dict info;
#ifdef _OPENMP
    info["openmp"] = true;
    info["max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = false;
    info["max_threads"] = 1;
#endif
    info["isa"] = cpu::active_isa();
    return info;
  });
  m.def("isa", &cpu::active_isa,
        "Instruction set the kernels run with (avx512, avx2 or generic); ARMFAST_CPU_ISA caps it.");
  m.def("fma_peak", &fma_peak, py::arg("dtype"), py::arg("iterations"), py::arg("threads") = 0,
        "Times `iterations` rounds of independent vector FMA chains on every thread (the ISA of "
        "isa()); returns a dict: flops (2 per lane per FMA), seconds, threads, chains, lanes, checksum.");
  const char* tensor_doc = " Tensors are (data_ptr, sizes, strides) tuples, strides in elements.";
  m.def("attention_forward", &attention_forward, py::arg("dtype"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("threads") = 0,
        (std::string("Flash attention forward: writes out [B,H,Nq,d] and lse [B,H,Nq].") + tensor_doc).c_str());
  m.def("attention_backward", &attention_backward, py::arg("dtype"), py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("scale"), py::arg("threads") = 0,
        (std::string("Flash attention backward: writes dq, dk, dv from the saved out and lse.") + tensor_doc).c_str());
  m.def("patch_text_logits_forward", &patch_text_logits_forward, py::arg("dtype"), py::arg("x"),
        py::arg("text"), py::arg("out"), py::arg("logit_scale"), py::arg("threads") = 0,
        (std::string("out [B,N,C] = logit_scale * normalize(x) normalize(text)^T.") + tensor_doc).c_str());
  m.def("patch_text_logits_backward", &patch_text_logits_backward, py::arg("dtype"), py::arg("dout"),
        py::arg("x"), py::arg("text"), py::arg("logit_scale"), py::arg("dx"), py::arg("dtext"),
        py::arg("threads") = 0,
        (std::string("Writes dx and dtext (None: skipped); returns d(loss)/d(logit_scale).") + tensor_doc).c_str());
  m.def("self_correlation_forward", &self_correlation_forward, py::arg("dtype"), py::arg("x"),
        py::arg("x2"), py::arg("v"), py::arg("out"), py::arg("scale"), py::arg("grid"),
        py::arg("threads") = 0,
        (std::string("out [B,H,N,d] = softmax(scale x x^T + G) v, G of grid=(h, w, class_token, "
                     "sigma) or none; with x2, (softmax(scale x x^T) + softmax(scale x2 x2^T)) v.") +
         tensor_doc).c_str());
  m.def("masked_affinity_forward", &masked_affinity_forward, py::arg("dtype"), py::arg("f"),
        py::arg("v"), py::arg("out"), py::arg("beta"), py::arg("gamma"), py::arg("threads") = 0,
        (std::string("out [B,H,n,d] = softmax(gamma S, S < beta mean(S) masked off the diagonal) v, "
                     "S the cosines of the rows of f [B,n,C].") + tensor_doc).c_str());
  m.def("similarity_aggregation_forward", &similarity_aggregation_forward, py::arg("dtype"),
        py::arg("f"), py::arg("x"), py::arg("out"), py::arg("threshold"), py::arg("threads") = 0,
        (std::string("out [B,N,D] = W x / (rowsum(W) + 1e-6), W = S [S >= threshold], S the cosines "
                     "of the rows of f [B,N,C].") + tensor_doc).c_str());
  m.def("averaged_dual_softmax_forward", &averaged_dual_softmax_forward, py::arg("dtype"),
        py::arg("f"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("scale"), py::arg("beta"),
        py::arg("gamma"), py::arg("threads") = 0,
        (std::string("out [B,H,N,d] = ((P_mask + softmax(scale k k^T)) / 2) v, P_mask = softmax(gamma "
                     "S, S < beta mean(S) masked off the diagonal).") + tensor_doc).c_str());
}
