// Registers the several-weights 4-bit GEMV (gemv_4bit_multi, gemv_cpu.h) on the extension module.
#pragma once

#include <pybind11/pybind11.h>

void register_gemv_multi(pybind11::module_& m);
