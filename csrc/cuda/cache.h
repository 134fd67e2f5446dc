// Paged KV cache writes' torch-free CUDA launcher: raw device pointers, sizes and a stream in, a
// cudaError_t out. The adapter in cache.cu calls it with torch's current stream, and so does the
// microbenchmark in bench/kernels. T is any element type: the op only copies.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastgen::cuda {

// key_cache[slot_mapping[t]] = key[t] and value_cache[slot_mapping[t]] = value[t], the caches
// seen as [num_slots, num_kv_heads, head_size] (slot = block * S + offset). A token whose slot
// is outside [0, num_slots) is skipped: a device kernel cannot raise, and must not write out of
// bounds (the CPU adapter rejects such slots instead).
template <typename T>
cudaError_t reshape_and_cache_launch(const T* key,                 // [num_tokens, num_kv_heads, head_size], rows key_stride apart
                                     const T* value,               // [num_tokens, num_kv_heads, head_size], rows value_stride apart
                                     T* key_cache,                 // [N, S, num_kv_heads, head_size]
                                     T* value_cache,               // [N, S, num_kv_heads, head_size]
                                     const int64_t* slot_mapping,  // [num_tokens]
                                     int64_t num_tokens, int64_t num_slots, int64_t num_kv_heads,
                                     int64_t head_size, int64_t key_stride, int64_t value_stride,
                                     cudaStream_t stream);

}  // namespace fastgen::cuda
