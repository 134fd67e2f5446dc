// Gated activations' torch-free CUDA launchers: raw device pointers, sizes and a stream in, a
// cudaError_t out. The adapter in activation.cu calls these with torch's current stream, and so
// does the microbenchmark in bench/kernels. T is float, __half or __nv_bfloat16.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastgen::cuda {

// out = silu(input[:, :inter]) * input[:, inter:], silu(x) = x / (1 + exp(-x)), in float32.
template <typename T>
cudaError_t silu_and_mul_launch(T* out,          // [num_tokens, inter]
                                const T* input,  // [num_tokens, 2 * inter], rows input_stride apart
                                int64_t num_tokens, int64_t inter, int64_t input_stride,
                                cudaStream_t stream);

}  // namespace fastgen::cuda
