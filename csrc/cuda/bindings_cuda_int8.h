// Registers the int8 GEMV of csrc/cuda/gemv_int8.cu on the extension module (cuda_gemv_int8); called
// from register_cuda (bindings_cuda.cpp).
#pragma once

#ifdef QM_HAVE_CUDA
#include <pybind11/pybind11.h>

void register_cuda_int8(pybind11::module_& m);
#endif
