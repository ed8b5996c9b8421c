// pybind11 face of csrc/cuda/gemv_int8.h: unpack integers, release the GIL, call, and turn a status
// code into a message naming the shapes. Argument checks live in converter/kernels_int8_cuda.py.
#include "bindings_cuda_int8.h"

#include <cstdint>
#include <stdexcept>
#include <string>

#include "gemv_int8.h"
#include "qm_cuda.h"

namespace py = pybind11;

void register_cuda_int8(py::module_& m) {
  m.def(
      "cuda_gemv_int8",
      [](int device, uintptr_t x, int dtype, int batch, int64_t N, int64_t K, uintptr_t codes, uintptr_t scb,
         uintptr_t bias, uintptr_t y, uintptr_t stream, int variant) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::gemv_int8(device, x, dtype, batch, N, K, codes, scb, bias, y, stream, variant);
        }
        if (s == 0) return;
        const std::string what = "cuda_gemv_int8(x [" + std::to_string(batch) + ", " + std::to_string(K) +
                                 "], codes [" + std::to_string(N) + ", " + std::to_string(K) + "], dtype code " +
                                 std::to_string(dtype) + ")";
        if (s < 0) throw std::invalid_argument(what + ": " + qm::cuda::status_text(s));
        throw std::runtime_error(what + ": " + qm::cuda::cuda_error_text(s));
      },
      py::arg("device"), py::arg("x"), py::arg("dtype"), py::arg("batch"), py::arg("N"), py::arg("K"),
      py::arg("codes"), py::arg("scb"), py::arg("bias"), py::arg("y"), py::arg("stream"), py::arg("variant") = 0);
}
