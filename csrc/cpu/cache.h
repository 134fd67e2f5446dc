// Paged KV cache writes' torch-free CPU launcher: raw pointers and sizes in, no at::Tensor.
// The adapter in cache.cpp and the microbenchmark in bench/kernels call it.
// T is any element type (float, c10::Half, c10::BFloat16): the op only copies.
#pragma once

#include <cstdint>

namespace fastgen::cpu {

// key_cache[slot_mapping[t]] = key[t] and value_cache[slot_mapping[t]] = value[t], the caches
// seen as [N * S, num_kv_heads, head_size] (slot = block * S + offset). Slots are not checked
// here: the caller guarantees 0 <= slot < N * S and that no two tokens share a slot.
template <typename T>
void reshape_and_cache_launch(const T* key,                // [num_tokens, num_kv_heads, head_size], rows key_stride apart
                              const T* value,              // [num_tokens, num_kv_heads, head_size], rows value_stride apart
                              T* key_cache,                // [N, S, num_kv_heads, head_size]
                              T* value_cache,              // [N, S, num_kv_heads, head_size]
                              const int64_t* slot_mapping, // [num_tokens]
                              int64_t num_tokens, int64_t num_kv_heads, int64_t head_size,
                              int64_t key_stride, int64_t value_stride);

}  // namespace fastgen::cpu
