// Paged causal attention's torch-free CPU launcher: raw pointers and sizes in, no at::Tensor. The
// adapter in attention.cpp and the microbenchmark in bench/kernels call it. Semantics (the
// contract) are in the `attention` schema in csrc/torch_bindings.cpp.
// T is float, c10::Half or c10::BFloat16; scores, softmax and the weighted sum are float32.
#pragma once

#include <cstdint>
#include <optional>

namespace fastgen::cpu {

// Inputs must be well formed (the adapter checks): cu_seqlens_q non-decreasing from 0,
// q_len <= seq_lens_k[b] <= max_blocks_per_seq * block_size, block ids < num_blocks.
// value_dim <= head_dim: the values are the first value_dim elements of each value row (head_dim
// for the `attention` op; MLA's mla_attention passes the latent cache as keys and values, L + R
// and L), and out's rows are value_dim wide.
template <typename T>
void attention_launch(T* out,                        // [num_tokens, num_heads, value_dim]
                      const T* query,                // [num_tokens, num_heads, head_dim], rows
                                                     //   query_stride apart
                      const T* key_cache,            // [num_blocks, block_size, num_kv_heads, head_dim]
                      const T* value_cache,          // [num_blocks, block_size, num_kv_heads, head_dim]
                      const int32_t* cu_seqlens_q,   // [num_seqs + 1]
                      const int32_t* seq_lens_k,     // [num_seqs]
                      const int32_t* block_tables,   // [num_seqs, max_blocks_per_seq]
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t value_dim, int64_t block_size, int64_t max_blocks_per_seq, int64_t query_stride,
                      float scale, std::optional<int64_t> sliding_window,
                      std::optional<int64_t> chunk_size);

}  // namespace fastgen::cpu
