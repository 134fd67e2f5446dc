// The torch-free CPU launcher of the linear op (out = input @ weight^T + bias) for few input rows:
// the decode-time GEMV / skinny GEMM that streams the weight once. Raw pointers and sizes in, no
// at::Tensor; its adapter in linear.cpp and the microbenchmark in bench/kernels call it.
// T (input, weight, bias) is float, c10::Half or c10::BFloat16; OutT is T or float (fp32 logits
// straight from a bf16 weight, with no bf16 rounding in between). Accumulation is in float32.
#pragma once

#include <cstdint>

namespace fastgen::cpu {

template <typename T, typename OutT>
void linear_launch(OutT* out,         // [m, n]
                   const T* input,    // [m, k], rows input_stride apart
                   const T* weight,   // [n, k], contiguous (nn.Linear's layout)
                   const T* bias,     // [n], or nullptr
                   int64_t m, int64_t n, int64_t k, int64_t input_stride);

}  // namespace fastgen::cpu
