// pybind11 binding of the CPU kernels: the private module converter._kernels.
//
// Thin on purpose: it unpacks pointer ints (Python passes tensor.data_ptr() and owns all memory),
// checks sizes, releases the GIL and calls the C++ in quant_cpu.h / gemv_cpu.h. Shapes and dtypes are
// validated and documented in converter/kernels.py; errors here name the argument that is wrong.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings_gemv_multi.h"
#include "bindings_int8.h"
#include "codebooks.h"
#include "binding_pointers.h"
#include "cpu_features.h"
#include "gemv_bf16.h"
#include "gemv_cpu.h"
#include "gemv_grouped.h"
#include "omp_team.h"
#include "quant_cpu.h"
#include "quant_stats.h"
#include "thread_pool.h"

#ifdef QM_HAVE_CUDA
#include "cuda/bindings_cuda.h"
#endif

namespace py = pybind11;

namespace {

using qm::ptr;

void check_n(int64_t n, const char* name) {
  if (n < 0) throw std::invalid_argument(std::string(name) + " must be >= 0, got " + std::to_string(n));
}

qm::QuantType parse_quant_type(int value) {
  if (value == static_cast<int>(qm::QuantType::NF4)) return qm::QuantType::NF4;
  if (value == static_cast<int>(qm::QuantType::FP4)) return qm::QuantType::FP4;
  throw std::invalid_argument("unknown quant_type " + std::to_string(value) + ": expected 1 (NF4) or 2 (FP4)");
}

template <size_t N, typename T>
std::vector<T> as_vector(const T (&table)[N]) {
  return std::vector<T>(table, table + N);
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "quantize-model CPU kernels (private; use converter.kernels)";
  m.attr("__version__") = QM_VERSION;

  m.def(
      "tables",
      [] {
        py::dict d;
        d["nf4"] = as_vector(qm::kNF4);
        d["nf4_thresholds"] = as_vector(qm::kNF4Thresholds);
        d["fp4"] = as_vector(qm::kFP4);
        d["fp4_thresholds"] = as_vector(qm::kFP4Thresholds);
        d["fp4_tree_codes"] = as_vector(qm::kFP4TreeCodes);
        d["fp4_sign_bit"] = qm::kFP4SignBit;
        d["nf4_zero_code"] = qm::kNF4ZeroCode;
        d["fp4_zero_code"] = qm::kFP4ZeroCode;
        d["dynamic8"] = as_vector(qm::kDynamic8);
        d["dynamic8_midpoints"] = as_vector(qm::kDynamic8Midpoints);
        d["tiny"] = qm::kTiny;
        d["nested_blocksize"] = qm::kNestedBlocksize;
        d["offset_chunk"] = qm::kOffsetChunk;
        return d;
      },
      "The code tables compiled into the kernels (float32 values widened to Python floats).");

  m.def(
      "cpu_isas",
      [] {
        std::vector<std::string> names;
        for (const qm::Isa isa : qm::supported_isas()) names.emplace_back(qm::isa_name(isa));
        return names;
      },
      "Kernel paths this CPU can run, best last: a subset of ['scalar', 'avx2', 'avx512', 'avx512bf16'].");
  m.def("default_threads", &qm::default_threads, "Threads used when threads == 0: CPUs in the affinity mask.");
  m.def("omp_team_available", &qm::omp_team_available,
        "Whether threads < 0 runs on the process's OpenMP team (an OpenMP runtime is loaded, e.g. by torch).");
  m.def(
      "has_cuda_build",
      [] {
#ifdef QM_HAVE_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether this extension was compiled with the CUDA backend.");

  m.def(
      "quantize_4bit",
      [](uintptr_t x, const std::string& dtype, int64_t n, int64_t blocksize, int quant_type, uintptr_t packed,
         uintptr_t absmax, const std::string& isa, int threads) {
        check_n(n, "n");
        const qm::DType dt = qm::parse_dtype(dtype);
        const qm::QuantType qt = parse_quant_type(quant_type);
        const qm::Isa path = qm::parse_isa(isa);
        if (n == 0) return int64_t{0};
        const void* xp = ptr<const void>(x, "x");
        auto* pp = ptr<uint8_t>(packed, "packed");
        auto* ap = ptr<float>(absmax, "absmax");
        py::gil_scoped_release release;
        return qm::quantize_4bit(xp, dt, n, blocksize, qt, pp, ap, path, threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("quant_type"), py::arg("packed"),
      py::arg("absmax"), py::arg("isa") = "auto", py::arg("threads") = 0,
      "Blockwise 4-bit quantization into packed [(n+1)//2] u8 and absmax [ceil(n/blocksize)] f32.\n"
      "Returns the number of blocks that hold a NaN or Inf (0 when the input is finite).");

  m.def(
      "quantize_nested",
      [](uintptr_t absmax, int64_t nb, uintptr_t codes, uintptr_t nested_absmax, const std::string& isa,
         int threads) {
        check_n(nb, "nb");
        const qm::Isa path = qm::parse_isa(isa);
        if (nb == 0) return 0.0f;
        const auto* ap = ptr<const float>(absmax, "absmax");
        auto* cp = ptr<uint8_t>(codes, "codes");
        auto* np = ptr<float>(nested_absmax, "nested_absmax");
        py::gil_scoped_release release;
        return qm::quantize_nested(ap, nb, cp, np, path, threads);
      },
      py::arg("absmax"), py::arg("nb"), py::arg("codes"), py::arg("nested_absmax"), py::arg("isa") = "auto",
      py::arg("threads") = 0,
      "Nested quantization of nb f32 absmax values into codes [nb] u8 and nested_absmax [ceil(nb/256)] f32.\n"
      "Returns the float32 offset, or NaN when absmax holds a NaN or Inf.");

  m.def(
      "dequantize_nested",
      [](uintptr_t codes, int64_t nb, uintptr_t nested_absmax, float offset, uintptr_t nested_map, uintptr_t out,
         int threads) {
        check_n(nb, "nb");
        if (nb == 0) return;
        const auto* cp = ptr<const uint8_t>(codes, "codes");
        const auto* np = ptr<const float>(nested_absmax, "nested_absmax");
        const auto* mp = ptr<const float>(nested_map, "nested_map");
        auto* op = ptr<float>(out, "out");
        py::gil_scoped_release release;
        qm::dequantize_nested(cp, nb, np, offset, mp, op, threads);
      },
      py::arg("codes"), py::arg("nb"), py::arg("nested_absmax"), py::arg("offset"), py::arg("nested_map"),
      py::arg("out"), py::arg("threads") = 0, "absmax = nested_map[codes] * nested_absmax[i // 256] + offset.");

  m.def(
      "dequantize_4bit",
      [](uintptr_t packed, uintptr_t absmax, int64_t n, int64_t blocksize, uintptr_t quant_map, uintptr_t out,
         const std::string& out_dtype, const std::string& isa, int threads) {
        check_n(n, "n");
        const qm::DType dt = qm::parse_dtype(out_dtype);
        const qm::Isa path = qm::parse_isa(isa);
        if (n == 0) return;
        const auto* pp = ptr<const uint8_t>(packed, "packed");
        const auto* ap = ptr<const float>(absmax, "absmax");
        const auto* qp = ptr<const float>(quant_map, "quant_map");
        void* op = ptr<void>(out, "out");
        py::gil_scoped_release release;
        qm::dequantize_4bit(pp, ap, n, blocksize, qp, op, dt, path, threads);
      },
      py::arg("packed"), py::arg("absmax"), py::arg("n"), py::arg("blocksize"), py::arg("quant_map"), py::arg("out"),
      py::arg("out_dtype"), py::arg("isa") = "auto", py::arg("threads") = 0,
      "out[k] = quant_map[q[k]] * absmax[k // blocksize] in f32, cast to out_dtype (round to nearest even).");

  m.def(
      "quant_error_stats",
      [](uintptr_t x, const std::string& dtype, int64_t n, int64_t blocksize, uintptr_t packed, uintptr_t absmax,
         uintptr_t quant_map, const std::string& isa, int threads) -> py::tuple {
        check_n(n, "n");
        const qm::DType dt = qm::parse_dtype(dtype);
        const qm::Isa path = qm::parse_isa(isa);
        if (n == 0) return py::make_tuple(0.0, 0.0, 0.0, int64_t{0});
        const void* xp = ptr<const void>(x, "x");
        const auto* pp = ptr<const uint8_t>(packed, "packed");
        const auto* ap = ptr<const float>(absmax, "absmax");
        const auto* qp = ptr<const float>(quant_map, "quant_map");
        qm::QuantErrorStats s;
        {
          py::gil_scoped_release release;
          s = qm::quant_error_stats(xp, dt, n, blocksize, pp, ap, qp, path, threads);
        }
        return py::make_tuple(s.sum_x2, s.sum_e2, s.max_abs_e, s.nonfinite);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("packed"), py::arg("absmax"),
      py::arg("quant_map"), py::arg("isa") = "auto", py::arg("threads") = 0,
      "(sum x^2, sum (x - v)^2, max |x - v|, non-finite count) with v = quant_map[q] * absmax[block].");

  m.def(
      "int8_error_stats",
      [](uintptr_t x, const std::string& dtype, int64_t rows, int64_t cols, uintptr_t codes, uintptr_t scb,
         int threads) -> py::tuple {
        check_n(rows, "rows");
        check_n(cols, "cols");
        const qm::DType dt = qm::parse_dtype(dtype);
        if (rows == 0 || cols == 0) return py::make_tuple(0.0, 0.0, 0.0, int64_t{0});
        const void* xp = ptr<const void>(x, "x");
        const auto* cp = ptr<const int8_t>(codes, "codes");
        const auto* sp = ptr<const float>(scb, "scb");
        qm::QuantErrorStats s;
        {
          py::gil_scoped_release release;
          s = qm::int8_error_stats(xp, dt, rows, cols, cp, sp, threads);
        }
        return py::make_tuple(s.sum_x2, s.sum_e2, s.max_abs_e, s.nonfinite);
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("codes"), py::arg("scb"),
      py::arg("threads") = 0,
      "(sum x^2, sum (x - v)^2, max |x - v|, non-finite count) with v = f32(f32(codes * SCB[row]) * f32(1/127)).");

  m.def(
      "count_nonfinite",
      [](uintptr_t x, const std::string& dtype, int64_t n, int threads) -> int64_t {
        check_n(n, "n");
        const qm::DType dt = qm::parse_dtype(dtype);
        if (n == 0) return 0;
        const void* xp = ptr<const void>(x, "x");
        py::gil_scoped_release release;
        return qm::count_nonfinite(xp, dt, n, threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("threads") = 0, "Number of NaN / Inf elements of x.");

  m.def(
      "gemv_bf16",
      [](uintptr_t x, const std::string& dtype, int64_t batch, int64_t in_features, int64_t out_features,
         uintptr_t w, uintptr_t y, const std::string& isa, int threads) {
        qm::GemvBf16Args a{};
        a.x_dtype = qm::parse_dtype(dtype);
        a.batch = batch;
        a.in_features = in_features;
        a.out_features = out_features;
        check_n(out_features, "out_features");
        const qm::Isa path = qm::parse_isa(isa);
        if (out_features == 0) return;
        a.x = ptr<const void>(x, "x");
        a.w = ptr<const uint16_t>(w, "w");
        a.y = ptr<void>(y, "y");
        py::gil_scoped_release release;
        qm::gemv_bf16(a, path, threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("batch"), py::arg("in_features"), py::arg("out_features"),
      py::arg("w"), py::arg("y"), py::arg("isa") = "auto", py::arg("threads") = 0,
      "y[b, o] = sum_k x[b, k] * W[o, k] for batch 1..8, W [out_features, in_features] bfloat16, float32\n"
      "accumulation; y has x's dtype.");

  m.def(
      "gemv_4bit",
      [](uintptr_t x, const std::string& dtype, int64_t batch, int64_t in_features, int64_t out_features,
         int64_t blocksize, uintptr_t packed, uintptr_t quant_map, uintptr_t absmax, uintptr_t absmax_codes,
         uintptr_t nested_absmax, float offset, uintptr_t nested_map, uintptr_t y, const std::string& isa,
         int threads) {
        qm::Gemv4bitArgs a{};
        a.x_dtype = qm::parse_dtype(dtype);
        a.batch = batch;
        a.in_features = in_features;
        a.out_features = out_features;
        a.blocksize = blocksize;
        check_n(out_features, "out_features");
        const qm::Isa path = qm::parse_isa(isa);
        if (out_features == 0) return;
        a.x = ptr<const void>(x, "x");
        a.packed = ptr<const uint8_t>(packed, "packed");
        a.quant_map = ptr<const float>(quant_map, "quant_map");
        if (absmax != 0) {
          a.absmax = reinterpret_cast<const float*>(absmax);
        } else {
          a.absmax_codes = ptr<const uint8_t>(absmax_codes, "absmax_codes (nested; absmax is 0)");
          a.nested_absmax = ptr<const float>(nested_absmax, "nested_absmax");
          a.map8 = ptr<const float>(nested_map, "nested_map");
          a.offset = offset;
        }
        a.y = ptr<void>(y, "y");
        py::gil_scoped_release release;
        qm::gemv_4bit(a, path, threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("batch"), py::arg("in_features"), py::arg("out_features"),
      py::arg("blocksize"), py::arg("packed"), py::arg("quant_map"), py::arg("absmax"), py::arg("absmax_codes"),
      py::arg("nested_absmax"), py::arg("offset"), py::arg("nested_map"), py::arg("y"), py::arg("isa") = "auto",
      py::arg("threads") = 0,
      "y[b, o] = sum_k x[b, k] * W[o, k] for batch 1..8, W packed 4-bit with f32 absmax (absmax != 0) or\n"
      "nested absmax (absmax == 0: absmax_codes, nested_absmax, offset, nested_map). in_features must be a\n"
      "multiple of blocksize. y has x's dtype.");

  m.def(
      "gemv_4bit_grouped",
      [](uintptr_t x, int64_t x_stride, const std::string& dtype, int64_t groups, int64_t in_features,
         int64_t out_features, int64_t blocksize, uintptr_t ids, int64_t experts, uintptr_t packed,
         int64_t packed_stride, uintptr_t absmax, int64_t absmax_stride, uintptr_t quant_map, uintptr_t y,
         const std::string& isa, int threads) {
        qm::GemvGroupedArgs a{};
        a.x = ptr<const void>(x, "x");
        a.x_stride = x_stride;
        a.x_dtype = qm::parse_dtype(dtype);
        a.groups = groups;
        a.in_features = in_features;
        a.out_features = out_features;
        a.blocksize = blocksize;
        a.ids = ptr<const int64_t>(ids, "ids");
        a.experts = experts;
        a.packed = ptr<const uint8_t>(packed, "packed");
        a.packed_stride = packed_stride;
        a.absmax = ptr<const float>(absmax, "absmax");
        a.absmax_stride = absmax_stride;
        a.quant_map = ptr<const float>(quant_map, "quant_map");
        a.y = ptr<void>(y, "y");
        const qm::Isa path = qm::parse_isa(isa);
        py::gil_scoped_release release;
        qm::gemv_4bit_grouped(a, path, threads);
      },
      py::arg("x"), py::arg("x_stride"), py::arg("dtype"), py::arg("groups"), py::arg("in_features"),
      py::arg("out_features"), py::arg("blocksize"), py::arg("ids"), py::arg("experts"), py::arg("packed"),
      py::arg("packed_stride"), py::arg("absmax"), py::arg("absmax_stride"), py::arg("quant_map"), py::arg("y"),
      py::arg("isa") = "auto", py::arg("threads") = 0,
      "MoE grouped GEMV: y[g, o] = sum_k x[g, k] * W_ids[g][o, k] (x_stride 0: one x row for every group).");

  register_int8(m);
  register_gemv_multi(m);  // bindings_gemv_multi.cpp

#ifdef QM_HAVE_CUDA
  register_cuda(m);
#endif
}
