// The element types the torch-free launchers take as a value (not a template parameter), so a
// launcher that chooses among kernels, and the C++ benchmark that calls it, need no
// at::ScalarType: csrc/cuda/attention.h's attention_launch takes one.
#pragma once

#include <cstdint>

namespace fastgen {

enum class DType { kFloat32, kFloat16, kBFloat16 };

constexpr int64_t element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace fastgen
