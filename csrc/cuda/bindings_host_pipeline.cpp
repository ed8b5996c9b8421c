// pybind11 face of host_pipeline.h: the torch-free --device cuda quantizer (converter/cuda_host.py).
// Host buffers are passed as integer addresses (numpy's __array_interface__); the caller keeps them
// alive until wait() returns for their ticket.
#include "bindings_host_pipeline.h"

#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "host_pipeline.h"
#include "qm_cuda.h"

namespace py = pybind11;
using qm::cuda::HostJob;
using qm::cuda::HostJobResult;
using qm::cuda::HostPipeline;

namespace {

std::string status_message(int status) {
  return status < 0 ? qm::cuda::status_text(status) : qm::cuda::cuda_error_text(status);
}

}  // namespace

void register_cuda_host_pipeline(py::module_& m) {
  m.def(
      "cuda_init",
      [](int device) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = qm::cuda::init_device(device);
        }
        if (s != 0) throw std::runtime_error("cuda_init(device=" + std::to_string(device) + "): " + status_message(s));
      },
      py::arg("device"), "Create the CUDA context of `device` now (GIL released): start-up overlaps other work");

  py::class_<HostPipeline>(m, "CudaHostPipeline")
      .def(py::init([](int device, int quant_type, int blocksize, bool nested, int64_t chunk_bytes, int threads,
                       std::vector<float> mids) {
             return std::make_unique<HostPipeline>(device, quant_type, blocksize, nested, chunk_bytes, threads,
                                                   std::move(mids));
           }),
           py::arg("device"), py::arg("quant_type"), py::arg("blocksize"), py::arg("nested"), py::arg("chunk_bytes"),
           py::arg("threads"), py::arg("mids"))
      .def(
          "submit",
          [](HostPipeline& p, uintptr_t x, int dtype, int64_t n, uintptr_t packed, uintptr_t absmax, uintptr_t codes,
             uintptr_t nested_absmax) {
            HostJob job;
            job.x = x;
            job.dtype = dtype;
            job.n = n;
            job.packed = packed;
            job.absmax = absmax;
            job.codes = codes;
            job.nested_absmax = nested_absmax;
            const int64_t ticket = p.submit(job);
            if (ticket < 0) {
              throw std::invalid_argument("CudaHostPipeline.submit(n " + std::to_string(n) + ", dtype code " +
                                          std::to_string(dtype) + "): " + status_message(static_cast<int>(ticket)));
            }
            return ticket;
          },
          py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("packed"), py::arg("absmax"), py::arg("codes"),
          py::arg("nested_absmax"))
      .def(
          "wait",
          [](HostPipeline& p, int64_t ticket) {
            HostJobResult r;
            {
              py::gil_scoped_release nogil;
              r = p.wait(ticket);
            }
            if (r.status != 0) {
              const std::string what = "CudaHostPipeline.wait(ticket " + std::to_string(ticket) + "): ";
              if (r.status < 0) throw std::invalid_argument(what + status_message(r.status));
              throw std::runtime_error(what + status_message(r.status));
            }
            return py::make_tuple(r.nonfinite, r.offset, r.stage, r.upload, r.kernels, r.download);
          },
          py::arg("ticket"),
          "(nonfinite, offset, seconds stage, upload, kernels, download) of a submitted tensor (GIL released)");
}
