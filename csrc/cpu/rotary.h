// Rotary position embedding's torch-free CPU launcher: raw pointers and sizes in, no at::Tensor.
// The adapter in rotary.cpp and the microbenchmark in bench/kernels call it.
// T is float, c10::Half or c10::BFloat16; the rotation is done in float32 and rounded once.
#pragma once

#include <cstdint>

namespace fastgen::cpu {

// For every head h and pair (a, b) of the first rot_dim dims, with angle theta = position * freq:
//   x[a] <- x[a] cos - x[b] sin,  x[b] <- x[b] cos + x[a] sin
// where (a, b) = (i, i + rot_dim / 2) if is_neox (rotate-half), else (2i, 2i + 1) (GPT-J), and
// cos / sin are cos_sin_cache[position, i] / cos_sin_cache[position, rot_dim / 2 + i].
// Positions are not checked here: the caller guarantees 0 <= positions[t] < max_position.
template <typename T>
void rotary_embedding_launch(const int64_t* positions,     // [num_tokens]
                             T* query,                     // [num_tokens, num_heads * head_size], rows query_stride apart
                             T* key,                       // [num_tokens, num_kv_heads * head_size], rows key_stride apart
                             const float* cos_sin_cache,   // [max_position, rot_dim]
                             int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                             int64_t head_size, int64_t rot_dim, int64_t query_stride,
                             int64_t key_stride, bool is_neox);

// Rotates query in place and writes each token's rotated key and its value into its slot of the
// paged cache (slot = block * block_size + offset); a negative slot (padding) is skipped and key
// is not modified. With q_norm_weight and k_norm_weight (both or neither), each query and key
// head is first RMS-normalised with that weight (over head_size, epsilon norm_eps).
// Positions and slots are not checked here.
template <typename T>
void rotary_embedding_and_cache_launch(const int64_t* positions,     // [num_tokens]
                                       T* query,                     // [num_tokens, num_heads * head_size]
                                       const T* key,                 // [num_tokens, num_kv_heads * head_size]
                                       const T* value,               // [num_tokens, num_kv_heads * head_size]
                                       const float* cos_sin_cache,   // [max_position, rot_dim]
                                       T* key_cache,                 // [N, S, num_kv_heads, head_size]
                                       T* value_cache,               // [N, S, num_kv_heads, head_size]
                                       const int64_t* slot_mapping,  // [num_tokens]
                                       const T* q_norm_weight,       // [head_size] or nullptr
                                       const T* k_norm_weight,       // [head_size] or nullptr
                                       float norm_eps, int64_t num_tokens, int64_t num_heads,
                                       int64_t num_kv_heads, int64_t head_size, int64_t rot_dim,
                                       int64_t query_stride, int64_t key_stride,
                                       int64_t value_stride, bool is_neox);

// DeepSeek's MLA: rotates the last rot_dim of each query head in place, and writes each token's
// cache row [RMSNorm(kv_a[:latent_size]) * kv_norm_weight | rotated kv_a[latent_size:]] into its
// slot of the latent cache (a negative slot is skipped). Positions and slots are not checked here.
template <typename T>
void mla_rotary_and_cache_launch(const int64_t* positions,     // [num_tokens]
                                 T* query,                     // [num_tokens, num_heads * head_size]
                                 const T* kv_a,                // [num_tokens, latent_size + rot_dim]
                                 const T* kv_norm_weight,      // [latent_size]
                                 float norm_eps,
                                 const float* cos_sin_cache,   // [max_position, rot_dim]
                                 T* latent_cache,              // [N, S, latent_size + rot_dim]
                                 const int64_t* slot_mapping,  // [num_tokens]
                                 int64_t num_tokens, int64_t num_heads, int64_t head_size,
                                 int64_t latent_size, int64_t rot_dim, int64_t query_stride,
                                 int64_t kv_a_stride, bool is_neox);

}  // namespace fastgen::cpu
