// Gated activations' torch-free CPU launchers: raw pointers and sizes in, no at::Tensor. The
// adapter in activation.cpp and the microbenchmark in bench/kernels call these.
// T is float, c10::Half or c10::BFloat16; math is done in float32.
#pragma once

#include <cstdint>

namespace fastgen::cpu {

// out = silu(input[:, :inter]) * input[:, inter:], silu(x) = x / (1 + exp(-x)).
template <typename T>
void silu_and_mul_launch(T* out,          // [num_tokens, inter]
                         const T* input,  // [num_tokens, 2 * inter], rows input_stride apart
                         int64_t num_tokens, int64_t inter, int64_t input_stride);

}  // namespace fastgen::cpu
