// Python bindings of the CUDA kernels (armfast._C_cuda). No libtorch: tensors arrive as data
// pointers with sizes and strides plus torch's current stream handle.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace armfast {
int cuda_device_count();
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "armfast CUDA kernels";
  m.def("device_count", &armfast::cuda_device_count,
        "Number of CUDA devices; raises RuntimeError when the driver cannot be used.");
  m.def("build_info", [] {
    py::dict info;
    info["cuda_archs"] = ARMFAST_CUDA_ARCHS;
    info["cuda_runtime"] = CUDART_VERSION;
    return info;
  });
}
