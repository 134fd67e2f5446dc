// Paged causal attention's torch-free CUDA launcher: raw device pointers, sizes and a stream in, a
// cudaError_t out. The adapter in attention.cu calls it with torch's current stream, and so does
// the microbenchmark in bench/kernels. Semantics (the contract) are in the `attention` schema in
// csrc/torch_bindings.cpp. T is float, __half or __nv_bfloat16; HEAD_DIM is 64, 128 or 256 (the
// instantiations in attention.cu).
#pragma once

#include <cstdint>
#include <optional>

#include <cuda_runtime.h>

namespace fastgen::cuda {

// The metadata must be well formed (it is on the device, so the adapter cannot check it without
// a sync): cu_seqlens_q non-decreasing from 0 to num_tokens, q_len <= seq_lens_k[b] <=
// max_blocks_per_seq * block_size, block ids < num_blocks.
template <typename T, int HEAD_DIM>
cudaError_t attention_launch(T* out,                       // [num_tokens, num_heads, HEAD_DIM]
                             const T* query,               // [num_tokens, num_heads, HEAD_DIM],
                                                           //   rows query_stride apart
                             const T* key_cache,           // [num_blocks, block_size, num_kv_heads, HEAD_DIM]
                             const T* value_cache,         // [num_blocks, block_size, num_kv_heads, HEAD_DIM]
                             const int32_t* cu_seqlens_q,  // [num_seqs + 1]
                             const int32_t* seq_lens_k,    // [num_seqs]
                             const int32_t* block_tables,  // [num_seqs, max_blocks_per_seq]
                             int64_t num_tokens, int64_t num_seqs, int64_t num_heads,
                             int64_t num_kv_heads, int64_t block_size,
                             int64_t max_blocks_per_seq, int64_t query_stride, float scale,
                             std::optional<int64_t> sliding_window,
                             std::optional<int64_t> chunk_size, cudaStream_t stream);

}  // namespace fastgen::cuda
