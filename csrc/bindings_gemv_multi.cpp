// pybind11 face of qm::gemv_4bit_multi: per-weight lists of pointer ints (Python owns the memory),
// one GIL release and one pool launch for all the weights that share x.
#include "bindings_gemv_multi.h"

#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "binding_pointers.h"
#include "cpu_features.h"
#include "gemv_cpu.h"

namespace py = pybind11;

void register_gemv_multi(py::module_& m) {
  m.def(
      "gemv_4bit_multi",
      [](uintptr_t x, const std::string& dtype, int64_t batch, int64_t in_features, int64_t blocksize,
         const std::vector<int64_t>& out_features, const std::vector<uintptr_t>& packed,
         const std::vector<uintptr_t>& quant_map, const std::vector<uintptr_t>& absmax,
         const std::vector<uintptr_t>& absmax_codes, const std::vector<uintptr_t>& nested_absmax,
         const std::vector<float>& offset, const std::vector<uintptr_t>& nested_map,
         const std::vector<uintptr_t>& y, const std::string& isa, int threads) {
        const size_t n = out_features.size();
        if (packed.size() != n || quant_map.size() != n || absmax.size() != n || absmax_codes.size() != n ||
            nested_absmax.size() != n || offset.size() != n || nested_map.size() != n || y.size() != n) {
          throw std::invalid_argument("gemv_4bit_multi: the per-weight lists have different lengths");
        }
        const qm::DType dt = qm::parse_dtype(dtype);
        const qm::Isa path = qm::parse_isa(isa);
        std::vector<qm::Gemv4bitArgs> segs;
        for (size_t i = 0; i < n; ++i) {
          if (out_features[i] < 0) {
            throw std::invalid_argument("out_features of weight " + std::to_string(i) + " must be >= 0");
          }
          if (out_features[i] == 0) continue;
          qm::Gemv4bitArgs a{};
          a.x = qm::ptr<const void>(x, "x");
          a.x_dtype = dt;
          a.batch = batch;
          a.in_features = in_features;
          a.out_features = out_features[i];
          a.blocksize = blocksize;
          a.packed = qm::ptr<const uint8_t>(packed[i], "packed");
          a.quant_map = qm::ptr<const float>(quant_map[i], "quant_map");
          if (absmax[i] != 0) {
            a.absmax = reinterpret_cast<const float*>(absmax[i]);
          } else {
            a.absmax_codes = qm::ptr<const uint8_t>(absmax_codes[i], "absmax_codes (nested; absmax is 0)");
            a.nested_absmax = qm::ptr<const float>(nested_absmax[i], "nested_absmax");
            a.map8 = qm::ptr<const float>(nested_map[i], "nested_map");
            a.offset = offset[i];
          }
          a.y = qm::ptr<void>(y[i], "y");
          segs.push_back(a);
        }
        py::gil_scoped_release release;
        qm::gemv_4bit_multi(segs, path, threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("batch"), py::arg("in_features"), py::arg("blocksize"),
      py::arg("out_features"), py::arg("packed"), py::arg("quant_map"), py::arg("absmax"), py::arg("absmax_codes"),
      py::arg("nested_absmax"), py::arg("offset"), py::arg("nested_map"), py::arg("y"), py::arg("isa") = "auto",
      py::arg("threads") = 0,
      "gemv_4bit for several weights of the same x and in_features in one call: lists with one entry per\n"
      "weight (absmax 0: nested, as in gemv_4bit); y[i] is [batch, out_features[i]] in x's dtype, equal bit\n"
      "for bit to gemv_4bit of weight i.");
}
