// How tensors cross the pybind11 boundary without libtorch: armfast/ops/_extension.py passes each
// one as a tuple (data_ptr, sizes, strides), strides in elements. The checks here are a last line
// of defence for direct callers; the Python layer validates with friendlier messages first.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace armfast {

using PyTensor = std::tuple<std::uintptr_t, std::vector<int64_t>, std::vector<int64_t>>;

struct TensorArg {
  std::uintptr_t ptr = 0;
  std::vector<int64_t> sizes, strides;

  int64_t size(int i) const { return sizes[i]; }
  int64_t stride(int i) const { return strides[i]; }
  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(ptr);
  }
};

inline std::string shape_str(const std::vector<int64_t>& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

// Unpacks `t` and checks its sizes against `expected` (-1 = any); std::invalid_argument becomes
// ValueError in Python.
inline TensorArg tensor_arg(const char* name, const PyTensor& t, const std::vector<int64_t>& expected) {
  TensorArg a{std::get<0>(t), std::get<1>(t), std::get<2>(t)};
  if (a.sizes.size() != a.strides.size())
    throw std::invalid_argument(std::string(name) + ": sizes and strides differ in length");
  bool ok = a.sizes.size() == expected.size();
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || a.sizes[i] == expected[i];
  if (!ok)
    throw std::invalid_argument(std::string(name) + ": expected shape " + shape_str(expected) +
                                " (-1 = any), got " + shape_str(a.sizes));
  for (size_t i = 0; i < a.sizes.size(); ++i) {
    if (a.sizes[i] < 1) throw std::invalid_argument(std::string(name) + ": empty dimension in " + shape_str(a.sizes));
    if (a.strides[i] < 0) throw std::invalid_argument(std::string(name) + ": negative stride in " + shape_str(a.strides));
  }
  if (a.ptr == 0) throw std::invalid_argument(std::string(name) + ": null data pointer");
  return a;
}

}  // namespace armfast
