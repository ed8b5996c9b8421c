// Thin pybind11 face of csrc/cuda/qm_cuda.h: unpack integers, release the GIL, call, and turn a
// status code into a message that names the call and its shapes. No logic lives here; the argument
// checks (dtypes, shapes, devices) are done by converter/kernels_cuda.py before calling.
#include "bindings_cuda.h"

#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings_cuda_int8.h"
#include "bindings_host_pipeline.h"
#include "qm_cuda.h"

namespace py = pybind11;
using qm::cuda::cuda_error_text;
using qm::cuda::status_text;

namespace {

void check(int status, const std::string& what) {
  if (status == 0) return;
  if (status < 0) throw std::invalid_argument(what + ": " + status_text(status));
  throw std::runtime_error(what + ": " + cuda_error_text(status));
}

std::string shape(int64_t a) { return "[" + std::to_string(a) + "]"; }
std::string shape(int64_t a, int64_t b) { return "[" + std::to_string(a) + ", " + std::to_string(b) + "]"; }

}  // namespace

void register_cuda(py::module_& m) {
  m.def(
      "cuda_available",
      []() {
        std::string why;
        const int n = qm::cuda::device_count(&why);
        return py::make_tuple(n, why);
      },
      "(device_count, reason) : device_count 0 with a one-line reason when no CUDA device is usable");

  m.def(
      "cuda_device_info",
      [](int device) {
        std::string name;
        int major = 0, minor = 0, sms = 0, l2 = 0;
        int64_t mem = 0;
        check(qm::cuda::device_props(device, &name, &major, &minor, &sms, &mem, &l2),
              "cuda_device_info(device=" + std::to_string(device) + ")");
        py::dict d;
        d["name"] = name;
        d["capability"] = py::make_tuple(major, minor);
        d["multiprocessors"] = sms;
        d["total_memory"] = mem;
        d["l2_bytes"] = l2;
        return d;
      },
      py::arg("device"));

  m.def(
      "cuda_quantize_4bit",
      [](int device, uintptr_t x, int dtype, int64_t n, int blocksize, int quant_type, uintptr_t packed,
         uintptr_t absmax, uintptr_t flag, uintptr_t stream) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::quantize_4bit(device, x, dtype, n, blocksize, quant_type, packed, absmax, flag, stream);
        }
        check(s, "cuda_quantize_4bit(x " + shape(n) + ", blocksize " + std::to_string(blocksize) + ", quant_type " +
                     std::to_string(quant_type) + ", dtype code " + std::to_string(dtype) + ")");
      },
      py::arg("device"), py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("quant_type"),
      py::arg("packed"), py::arg("absmax"), py::arg("flag"), py::arg("stream"));

  m.def(
      "cuda_quantize_nested",
      [](int device, uintptr_t absmax, int64_t nb, uintptr_t mids, uintptr_t chunk_sums, uintptr_t offset_out,
         uintptr_t codes, uintptr_t nested_absmax, uintptr_t stream) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::quantize_nested(device, absmax, nb, mids, chunk_sums, offset_out, codes, nested_absmax,
                                        stream);
        }
        check(s, "cuda_quantize_nested(absmax " + shape(nb) + ")");
      },
      py::arg("device"), py::arg("absmax"), py::arg("nb"), py::arg("mids"), py::arg("chunk_sums"),
      py::arg("offset_out"), py::arg("codes"), py::arg("nested_absmax"), py::arg("stream"));

  m.def(
      "cuda_dequantize_nested",
      [](int device, uintptr_t codes, int64_t nb, uintptr_t nested_absmax, float offset, uintptr_t map8,
         uintptr_t absmax_out, uintptr_t stream) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::dequantize_nested(device, codes, nb, nested_absmax, offset, map8, absmax_out, stream);
        }
        check(s, "cuda_dequantize_nested(codes " + shape(nb) + ")");
      },
      py::arg("device"), py::arg("codes"), py::arg("nb"), py::arg("nested_absmax"), py::arg("offset"),
      py::arg("map8"), py::arg("absmax_out"), py::arg("stream"));

  m.def(
      "cuda_dequantize_4bit",
      [](int device, uintptr_t packed, int64_t n, int blocksize, uintptr_t absmax, uintptr_t ncodes,
         uintptr_t nested_absmax, float offset, uintptr_t map8, uintptr_t quant_map, int out_dtype, uintptr_t out,
         uintptr_t stream) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::dequantize_4bit(device, packed, n, blocksize, absmax, ncodes, nested_absmax, offset, map8,
                                        quant_map, out_dtype, out, stream);
        }
        check(s, "cuda_dequantize_4bit(n " + std::to_string(n) + ", blocksize " + std::to_string(blocksize) +
                     ", out dtype code " + std::to_string(out_dtype) + ")");
      },
      py::arg("device"), py::arg("packed"), py::arg("n"), py::arg("blocksize"), py::arg("absmax"), py::arg("ncodes"),
      py::arg("nested_absmax"), py::arg("offset"), py::arg("map8"), py::arg("quant_map"), py::arg("out_dtype"),
      py::arg("out"), py::arg("stream"));

  m.def(
      "cuda_gemv_4bit",
      [](int device, uintptr_t x, int dtype, int batch, int64_t N, int64_t K, int blocksize, uintptr_t packed,
         uintptr_t absmax, uintptr_t ncodes, uintptr_t nested_absmax, float offset, uintptr_t map8,
         uintptr_t quant_map, uintptr_t y, uintptr_t stream, int variant, uintptr_t scratch) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::gemv_4bit(device, x, dtype, batch, N, K, blocksize, packed, absmax, ncodes, nested_absmax,
                                  offset, map8, quant_map, y, stream, variant, scratch);
        }
        check(s, "cuda_gemv_4bit(x " + shape(batch, K) + ", weight " + shape(N, K) + ", blocksize " +
                     std::to_string(blocksize) + ", dtype code " + std::to_string(dtype) + ")");
      },
      py::arg("device"), py::arg("x"), py::arg("dtype"), py::arg("batch"), py::arg("N"), py::arg("K"),
      py::arg("blocksize"), py::arg("packed"), py::arg("absmax"), py::arg("ncodes"), py::arg("nested_absmax"),
      py::arg("offset"), py::arg("map8"), py::arg("quant_map"), py::arg("y"), py::arg("stream"),
      py::arg("variant") = 0, py::arg("scratch") = 0);

  m.def(
      "cuda_gemv_4bit_multi",
      [](int device, uintptr_t x, int dtype, int batch, int64_t K, int blocksize, const std::vector<int64_t>& N,
         const std::vector<uintptr_t>& packed, const std::vector<uintptr_t>& absmax,
         const std::vector<uintptr_t>& ncodes, const std::vector<uintptr_t>& nested_absmax,
         const std::vector<float>& offset, const std::vector<uintptr_t>& map8, const std::vector<uintptr_t>& quant_map,
         const std::vector<uintptr_t>& y, uintptr_t stream, int variant, uintptr_t scratch) {
        const size_t n = N.size();
        if (n < 1 || n > static_cast<size_t>(qm::cuda::kGemvMaxWeights) || packed.size() != n ||
            absmax.size() != n || ncodes.size() != n || nested_absmax.size() != n || offset.size() != n ||
            map8.size() != n || quant_map.size() != n || y.size() != n)
          throw std::invalid_argument("cuda_gemv_4bit_multi: expected 1.." + std::to_string(qm::cuda::kGemvMaxWeights) +
                                      " weights with one entry each in every per-weight list");
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::gemv_4bit_multi(device, x, dtype, batch, K, blocksize, static_cast<int>(n), N.data(),
                                        packed.data(), absmax.data(), ncodes.data(), nested_absmax.data(),
                                        offset.data(), map8.data(), quant_map.data(), y.data(), stream, variant,
                                        scratch);
        }
        std::string weights;
        for (size_t i = 0; i < n; ++i) weights += (i ? ", " : "") + shape(N[i], K);
        check(s, "cuda_gemv_4bit_multi(x " + shape(batch, K) + ", weights " + weights + ", blocksize " +
                     std::to_string(blocksize) + ", dtype code " + std::to_string(dtype) + ")");
      },
      py::arg("device"), py::arg("x"), py::arg("dtype"), py::arg("batch"), py::arg("K"), py::arg("blocksize"),
      py::arg("N"), py::arg("packed"), py::arg("absmax"), py::arg("ncodes"), py::arg("nested_absmax"),
      py::arg("offset"), py::arg("map8"), py::arg("quant_map"), py::arg("y"), py::arg("stream"),
      py::arg("variant") = 0, py::arg("scratch") = 0);

  m.def("cuda_gemv_4bit_multi_scratch", &qm::cuda::gemv_4bit_multi_scratch,
        "float32 elements of scratch cuda_gemv_4bit_multi needs (rows: the sum of the weights' N; 0: none)",
        py::arg("device"), py::arg("dtype"), py::arg("batch"), py::arg("rows"), py::arg("K"), py::arg("blocksize"),
        py::arg("variant"));

  m.def("cuda_gemv_4bit_scratch", &qm::cuda::gemv_4bit_scratch,
        "float32 elements of scratch cuda_gemv_4bit needs (0: none)", py::arg("device"), py::arg("dtype"),
        py::arg("batch"), py::arg("N"), py::arg("K"), py::arg("blocksize"), py::arg("variant"));

  m.def(
      "cuda_quantize_int8",
      [](int device, uintptr_t x, int dtype, int64_t rows, int64_t cols, uintptr_t table, uintptr_t codes,
         uintptr_t scb, uintptr_t flag, uintptr_t stream) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::quantize_int8(device, x, dtype, rows, cols, table, codes, scb, flag, stream);
        }
        check(s, "cuda_quantize_int8(x " + shape(rows, cols) + ", dtype code " + std::to_string(dtype) + ")");
      },
      py::arg("device"), py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("table"),
      py::arg("codes"), py::arg("scb"), py::arg("flag"), py::arg("stream"));

  m.def(
      "cuda_dequantize_int8",
      [](int device, uintptr_t codes, uintptr_t scb, int64_t rows, int64_t cols, int out_dtype, uintptr_t out,
         uintptr_t stream) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::dequantize_int8(device, codes, scb, rows, cols, out_dtype, out, stream);
        }
        check(s, "cuda_dequantize_int8(codes " + shape(rows, cols) + ", out dtype code " + std::to_string(out_dtype) +
                     ")");
      },
      py::arg("device"), py::arg("codes"), py::arg("scb"), py::arg("rows"), py::arg("cols"), py::arg("out_dtype"),
      py::arg("out"), py::arg("stream"));

  register_cuda_int8(m);  // cuda_gemv_int8 (bindings_cuda_int8.cpp)
  register_cuda_host_pipeline(m);  // the torch-free --device cuda quantizer
  register_moe_cuda(m);
}
