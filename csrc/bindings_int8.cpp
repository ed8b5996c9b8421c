// pybind11 binding of the int8 CPU kernels (int8_cpu.h), thin as bindings.cpp: pointer ints in,
// sizes checked, GIL released. Shapes and dtypes are validated in converter/kernels_int8.py.
#include "bindings_int8.h"

#include <cstdint>
#include <stdexcept>
#include <string>

#include "binding_pointers.h"
#include "cpu_features.h"
#include "int8_cpu.h"

namespace py = pybind11;

using qm::ptr;

void register_int8(py::module_& m) {
  m.attr("int8_scale_table_size") = qm::kInt8ScaleTableSize;
  m.attr("int8_inv127_bits") = qm::kInv127Bits;
  m.attr("gemv_int8_max_batch") = qm::kGemvInt8MaxBatch;

  m.def(
      "quantize_int8",
      [](uintptr_t x, const std::string& dtype, int64_t rows, int64_t cols, uintptr_t codes, uintptr_t scb,
         uintptr_t scale_table, const std::string& isa, int threads) {
        const qm::DType dt = qm::parse_dtype(dtype);
        const qm::Isa path = qm::parse_isa(isa);
        if (rows < 0 || cols < 0) throw std::invalid_argument("rows and cols must be >= 0");
        if (rows == 0) return int64_t{0};
        auto* sp = ptr<float>(scb, "scb");
        const void* xp = cols == 0 ? nullptr : ptr<const void>(x, "x");
        auto* cp = cols == 0 ? nullptr : ptr<int8_t>(codes, "codes");
        const auto* tp = reinterpret_cast<const float*>(scale_table);  // 0: bnb's CPU scale
        py::gil_scoped_release release;
        return qm::quantize_int8(xp, dt, rows, cols, cp, sp, tp, path, threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("codes"), py::arg("scb"),
      py::arg("scale_table") = 0, py::arg("isa") = "auto", py::arg("threads") = 0,
      "Row-wise int8 quantization (bnb LLM.int8) into codes [rows*cols] i8 and SCB [rows] f32.\n"
      "scale_table: 0 for bnb's CPU scale, else a pointer to int8_scale_table_size f32 scales indexed by\n"
      "the fp16 bits of SCB. Returns the number of rows holding a NaN or Inf.");

  m.def(
      "dequantize_int8",
      [](uintptr_t codes, uintptr_t scb, int64_t rows, int64_t cols, uintptr_t out, const std::string& out_dtype,
         const std::string& isa, int threads) {
        const qm::DType dt = qm::parse_dtype(out_dtype);
        const qm::Isa path = qm::parse_isa(isa);
        if (rows < 0 || cols < 0) throw std::invalid_argument("rows and cols must be >= 0");
        if (rows == 0 || cols == 0) return;
        const auto* cp = ptr<const int8_t>(codes, "codes");
        const auto* sp = ptr<const float>(scb, "scb");
        void* op = ptr<void>(out, "out");
        py::gil_scoped_release release;
        qm::dequantize_int8(cp, sp, rows, cols, op, dt, path, threads);
      },
      py::arg("codes"), py::arg("scb"), py::arg("rows"), py::arg("cols"), py::arg("out"), py::arg("out_dtype"),
      py::arg("isa") = "auto", py::arg("threads") = 0,
      "out = f32(f32(codes * SCB[row]) * f32(1/127)) cast to out_dtype (round to nearest even).");

  m.def(
      "gemv_int8",
      [](uintptr_t x, const std::string& dtype, int64_t batch, int64_t in_features, int64_t out_features,
         uintptr_t codes, uintptr_t scb, uintptr_t y, const std::string& isa, int threads) {
        const qm::DType dt = qm::parse_dtype(dtype);
        const qm::Isa path = qm::parse_isa(isa);
        if (out_features == 0) return;
        const void* xp = ptr<const void>(x, "x");
        const auto* cp = ptr<const int8_t>(codes, "codes");
        const auto* sp = ptr<const float>(scb, "scb");
        void* yp = ptr<void>(y, "y");
        py::gil_scoped_release release;
        qm::gemv_int8(xp, dt, batch, in_features, out_features, cp, sp, yp, path, threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("batch"), py::arg("in_features"), py::arg("out_features"),
      py::arg("codes"), py::arg("scb"), py::arg("y"), py::arg("isa") = "auto", py::arg("threads") = 0,
      "y[b, o] = sum_k x[b, k] * codes[o, k] * SCB[o] / 127 for batch 1..8 (float32 sums); y has x's dtype.");
}
