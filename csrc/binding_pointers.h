// Raw addresses from Python (tensor.data_ptr(), numpy buffers) turned into typed pointers, for the
// pybind11 bindings of every kernel family: one definition, one error message.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace qm {

template <typename T>
T* ptr(uintptr_t address, const char* name) {
  if (address == 0) throw std::invalid_argument(std::string(name) + " is a null pointer");
  return reinterpret_cast<T*>(address);
}

}  // namespace qm
