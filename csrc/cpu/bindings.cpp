// Python bindings of the CPU kernels (armfast._C). No libtorch: tensors arrive as data
// pointers with sizes and strides; armfast/ops/_extension.py validates and allocates.
#include <pybind11/pybind11.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

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
    return info;
  });
}
