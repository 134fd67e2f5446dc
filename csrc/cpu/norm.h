// RMSNorm's torch-free CPU launchers: raw pointers and sizes in, no at::Tensor. Every kernel
// family has such a header (csrc/cpu/<family>.h); its adapter in <family>.cpp and the
// microbenchmark in bench/kernels call these.
// T is float, c10::Half or c10::BFloat16; math is done in float32.
#pragma once

#include <cstdint>
#include <optional>

namespace fastgen::cpu {

template <typename T>
void rms_norm_launch(T* out,           // [num_tokens, hidden]
                     const T* input,   // [num_tokens, hidden], rows input_stride apart
                     const T* weight,  // [hidden]
                     float epsilon, int64_t num_tokens, int64_t hidden, int64_t input_stride);

template <typename T>
void fused_add_rms_norm_launch(T* input,         // [num_tokens, hidden], becomes the norm
                               T* residual,      // [num_tokens, hidden], becomes input + residual
                               const T* weight,  // [hidden]
                               float epsilon, int64_t num_tokens, int64_t hidden);

}  // namespace fastgen::cpu
