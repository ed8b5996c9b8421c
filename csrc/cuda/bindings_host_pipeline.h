// Registers cuda_init and the CudaHostPipeline class (bindings_host_pipeline.cpp) on the extension;
// called from register_cuda (bindings_cuda.cpp).
#pragma once

#ifdef QM_HAVE_CUDA
#include <pybind11/pybind11.h>

void register_cuda_host_pipeline(pybind11::module_& m);
#endif
