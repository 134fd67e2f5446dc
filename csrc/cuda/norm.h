// RMSNorm's torch-free CUDA launchers: raw device pointers, sizes and a stream in, a cudaError_t
// out. Every kernel family has such a header (csrc/cuda/<family>.h); its adapter in <family>.cu
// calls these with torch's current stream, and so does the microbenchmark in bench/kernels.
// T is float, __half or __nv_bfloat16.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastgen::cuda {

template <typename T>
cudaError_t rms_norm_launch(T* out,           // [num_tokens, hidden]
                            const T* input,   // [num_tokens, hidden], rows input_stride apart
                            const T* weight,  // [hidden]
                            float epsilon, int64_t num_tokens, int64_t hidden,
                            int64_t input_stride, cudaStream_t stream);

template <typename T>
cudaError_t fused_add_rms_norm_launch(T* input,         // [num_tokens, hidden], becomes the norm
                                      T* residual,      // [num_tokens, hidden], becomes input + residual
                                      const T* weight,  // [hidden]
                                      float epsilon, int64_t num_tokens, int64_t hidden,
                                      cudaStream_t stream);

}  // namespace fastgen::cuda
