// Dispatch macros: turn a runtime dtype / head size / flag into a compile-time constant.
// Every one names the unsupported value when it fails, so an error says what was passed.
//
//   FASTGEN_DISPATCH_FLOAT(x.scalar_type(), "rms_norm", [&] {
//     launch<scalar_t>(...);                      // scalar_t: float, at::Half or at::BFloat16
//   });
//   FASTGEN_DISPATCH_HEAD_DIM(head_dim, "attention", [&] {
//     launch<HEAD_DIM>(...);                      // HEAD_DIM: constexpr int
//   });
//   FASTGEN_DISPATCH_BOOL(is_neox, IS_NEOX, [&] { launch<IS_NEOX>(...); });
//   const DType dtype = float_dtype(x.scalar_type(), "attention");  // for launchers taking a DType
#pragma once

#include <type_traits>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "core/dtype.h"

#define FASTGEN_DISPATCH_FLOAT(dtype, op_name, ...)                                         \
  [&] {                                                                                     \
    switch (dtype) {                                                                        \
      case at::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); }         \
      case at::ScalarType::Half: { using scalar_t = at::Half; return __VA_ARGS__(); }       \
      case at::ScalarType::BFloat16: { using scalar_t = at::BFloat16; return __VA_ARGS__(); } \
      default:                                                                              \
        TORCH_CHECK(false, op_name, ": unsupported dtype ", dtype,                          \
                    " (supported: float32, float16, bfloat16)");                            \
    }                                                                                       \
  }()

#define FASTGEN_DISPATCH_HEAD_DIM(head_dim, op_name, ...)                                   \
  [&] {                                                                                     \
    switch (head_dim) {                                                                     \
      case 64: { constexpr int HEAD_DIM = 64; return __VA_ARGS__(); }                       \
      case 128: { constexpr int HEAD_DIM = 128; return __VA_ARGS__(); }                     \
      case 256: { constexpr int HEAD_DIM = 256; return __VA_ARGS__(); }                     \
      default:                                                                              \
        TORCH_CHECK(false, op_name, ": unsupported head size ", head_dim,                   \
                    " (supported: 64, 128, 256)");                                          \
    }                                                                                       \
  }()

#define FASTGEN_DISPATCH_BOOL(cond, CONST_NAME, ...)                                        \
  [&] {                                                                                     \
    if (cond) { constexpr bool CONST_NAME = true; return __VA_ARGS__(); }                   \
    constexpr bool CONST_NAME = false;                                                      \
    return __VA_ARGS__();                                                                   \
  }()

namespace fastgen {

// The DType (core/dtype.h) of a float32 / float16 / bfloat16 tensor; any other dtype fails as in
// FASTGEN_DISPATCH_FLOAT.
inline DType float_dtype(at::ScalarType dtype, const char* op_name) {
  return FASTGEN_DISPATCH_FLOAT(dtype, op_name, [&] {
    if constexpr (std::is_same_v<scalar_t, float>) return DType::kFloat32;
    else if constexpr (std::is_same_v<scalar_t, at::Half>) return DType::kFloat16;
    else return DType::kBFloat16;
  });
}

}  // namespace fastgen
