// Registers the CUDA backend's functions on the extension module (called from csrc/bindings.cpp
// under #ifdef QM_HAVE_CUDA). Functions added: cuda_available, cuda_device_info, cuda_quantize_4bit,
// cuda_quantize_nested, cuda_dequantize_nested, cuda_dequantize_4bit, cuda_gemv_4bit, cuda_quantize_int8,
// cuda_dequantize_int8.
#pragma once

#ifdef QM_HAVE_CUDA
#include <pybind11/pybind11.h>

void register_cuda(pybind11::module_& m);
// MoE kernels (bindings_moe_cuda.cpp): cuda_gemv_4bit_grouped(_glu, _sum), cuda_dequantize_4bit_grouped.
void register_moe_cuda(pybind11::module_& m);
#endif
