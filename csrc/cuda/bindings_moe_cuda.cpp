// pybind11 face of csrc/cuda/moe_cuda.h (called from register_cuda): unpack integers, release the GIL,
// call, and turn a status into a message naming the shapes. Arguments are checked by
// converter/loader/moe_cuda.py before the call.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings_cuda.h"
#include "moe_cuda.h"
#include "qm_cuda.h"

namespace py = pybind11;

namespace {

void check(int status, const std::string& what) {
  if (status == 0) return;
  if (status < 0) throw std::invalid_argument(what + ": " + qm::cuda::status_text(status));
  throw std::runtime_error(what + ": " + qm::cuda::cuda_error_text(status));
}

}  // namespace

void register_moe_cuda(py::module_& m) {
  m.def(
      "cuda_gemv_4bit_grouped",
      [](int device, uintptr_t x, int dtype, int64_t groups, int64_t x_share, int64_t N, int64_t K, int blocksize,
         uintptr_t ids, int64_t experts, uintptr_t packed, int64_t packed_stride, uintptr_t absmax,
         int64_t absmax_stride, uintptr_t quant_map, uintptr_t y, uintptr_t stream, int lanes) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::gemv_4bit_grouped(device, x, dtype, groups, x_share, N, K, blocksize, ids, experts, packed,
                                          packed_stride, absmax, absmax_stride, quant_map, y, stream, lanes);
        }
        check(s, "cuda_gemv_4bit_grouped(groups " + std::to_string(groups) + ", weight [" + std::to_string(N) +
                     ", " + std::to_string(K) + "], blocksize " + std::to_string(blocksize) + ", dtype code " +
                     std::to_string(dtype) + ")");
      },
      py::arg("device"), py::arg("x"), py::arg("dtype"), py::arg("groups"), py::arg("x_share"), py::arg("N"),
      py::arg("K"), py::arg("blocksize"), py::arg("ids"), py::arg("experts"), py::arg("packed"),
      py::arg("packed_stride"), py::arg("absmax"), py::arg("absmax_stride"), py::arg("quant_map"), py::arg("y"),
      py::arg("stream"), py::arg("lanes") = 0,
      "MoE grouped GEMV on CUDA: y[g, o] = sum_k x[g / x_share, k] * W_ids[g][o, k]; ids int64 on the device.");

  m.def(
      "cuda_gemv_4bit_grouped_glu",
      [](int device, uintptr_t x, int dtype, int64_t groups, int64_t x_share, int64_t I, int64_t K, int blocksize,
         uintptr_t ids, int64_t experts, uintptr_t packed, int64_t packed_stride, uintptr_t absmax,
         int64_t absmax_stride, uintptr_t quant_map, uintptr_t h, uintptr_t stream, int lanes) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::gemv_4bit_grouped_glu(device, x, dtype, groups, x_share, I, K, blocksize, ids, experts,
                                              packed, packed_stride, absmax, absmax_stride, quant_map, h, stream,
                                              lanes);
        }
        check(s, "cuda_gemv_4bit_grouped_glu(groups " + std::to_string(groups) + ", gate/up [" + std::to_string(I) +
                     ", " + std::to_string(K) + "], blocksize " + std::to_string(blocksize) + ", dtype code " +
                     std::to_string(dtype) + ")");
      },
      py::arg("device"), py::arg("x"), py::arg("dtype"), py::arg("groups"), py::arg("x_share"), py::arg("I"),
      py::arg("K"), py::arg("blocksize"), py::arg("ids"), py::arg("experts"), py::arg("packed"),
      py::arg("packed_stride"), py::arg("absmax"), py::arg("absmax_stride"), py::arg("quant_map"), py::arg("h"),
      py::arg("stream"), py::arg("lanes") = 0,
      "Decode's first projection with SiLU: h[g] = silu(x W_gate.T) * (x W_up.T) of expert ids[g].");

  m.def(
      "cuda_gemv_4bit_grouped_sum",
      [](int device, uintptr_t h, int dtype, int64_t tokens, int k, int64_t N, int64_t K, int blocksize,
         uintptr_t ids, int64_t experts, uintptr_t weights, int w_dtype, uintptr_t packed, int64_t packed_stride,
         uintptr_t absmax, int64_t absmax_stride, uintptr_t quant_map, uintptr_t y, uintptr_t stream,
         int lanes) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::gemv_4bit_grouped_sum(device, h, dtype, tokens, k, N, K, blocksize, ids, experts, weights,
                                              w_dtype, packed, packed_stride, absmax, absmax_stride, quant_map, y,
                                              stream, lanes);
        }
        check(s, "cuda_gemv_4bit_grouped_sum(tokens " + std::to_string(tokens) + ", k " + std::to_string(k) +
                     ", down [" + std::to_string(N) + ", " + std::to_string(K) + "], blocksize " +
                     std::to_string(blocksize) + ", dtype code " + std::to_string(dtype) + ")");
      },
      py::arg("device"), py::arg("h"), py::arg("dtype"), py::arg("tokens"), py::arg("k"), py::arg("N"),
      py::arg("K"), py::arg("blocksize"), py::arg("ids"), py::arg("experts"), py::arg("weights"),
      py::arg("w_dtype"), py::arg("packed"), py::arg("packed_stride"), py::arg("absmax"), py::arg("absmax_stride"),
      py::arg("quant_map"), py::arg("y"), py::arg("stream"), py::arg("lanes") = 0,
      "Decode's second projection and routing sum: y[t] = sum_j w[t k + j] * (h[t k + j] W_down(ids[t k + j]).T).");

  m.def(
      "cuda_dequantize_4bit_grouped",
      [](int device, uintptr_t ids, int64_t count, int64_t experts, uintptr_t packed, int64_t packed_stride,
         uintptr_t absmax, int64_t absmax_stride, int64_t n, int blocksize, uintptr_t quant_map, int out_dtype,
         uintptr_t out, uintptr_t stream) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::dequantize_4bit_grouped(device, ids, count, experts, packed, packed_stride, absmax,
                                                absmax_stride, n, blocksize, quant_map, out_dtype, out, stream);
        }
        check(s, "cuda_dequantize_4bit_grouped(count " + std::to_string(count) + ", n " + std::to_string(n) +
                     ", blocksize " + std::to_string(blocksize) + ", out dtype code " + std::to_string(out_dtype) +
                     ")");
      },
      py::arg("device"), py::arg("ids"), py::arg("count"), py::arg("experts"), py::arg("packed"),
      py::arg("packed_stride"), py::arg("absmax"), py::arg("absmax_stride"), py::arg("n"), py::arg("blocksize"),
      py::arg("quant_map"), py::arg("out_dtype"), py::arg("out"), py::arg("stream"),
      "out[i, :n] = dequantized weights of expert ids[i] (MoE prefill); ids int64 on the device.");

  m.def(
      "cuda_route_topk",
      [](int device, uintptr_t logits, int dtype, int64_t rows, int64_t experts, int k, bool renorm, int out_dtype,
         int sum_order, int tie_mode, uintptr_t weights, uintptr_t indices, uintptr_t stream) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::route_topk(device, logits, dtype, rows, experts, k, renorm, out_dtype, sum_order, tie_mode,
                                   weights, indices, stream);
        }
        check(s, "cuda_route_topk(rows " + std::to_string(rows) + ", experts " + std::to_string(experts) +
                     ", k " + std::to_string(k) + ", dtype code " + std::to_string(dtype) + ", out dtype code " +
                     std::to_string(out_dtype) + ")");
      },
      py::arg("device"), py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("experts"), py::arg("k"),
      py::arg("renorm"), py::arg("out_dtype"), py::arg("sum_order"), py::arg("tie_mode"), py::arg("weights"),
      py::arg("indices"), py::arg("stream"),
      "MoE router after its linear: softmax, top-k, optional renormalisation and cast in one launch.");
}
