// Registers the int8 (LLM.int8) CPU kernels on the extension module (called from bindings.cpp).
#pragma once

#include <pybind11/pybind11.h>

void register_int8(pybind11::module_& m);
