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

// The decode special case (every sequence has at most one query, the last of its cached keys):
// split-KV attention, see decode_attention.cu. num_splits comes from decode_attention_num_splits
// (an upper bound on the context is enough; sequences use only the splits their length needs),
// and workspace holds decode_attention_workspace_floats(...) floats (none when num_splits is 1).
// A sequence with no visible key (seq_lens_k[b] == 0: a CUDA graph's padding row) gets zeros.
// Pointers and shapes are attention_launch's; cu_seqlens_q steps by 0 or 1.
template <typename T, int HEAD_DIM>
int decode_attention_num_splits(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                int64_t max_seqlen_k, int num_sms);

int64_t decode_attention_workspace_floats(int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                          int num_splits);

template <typename T, int HEAD_DIM>
cudaError_t decode_attention_launch(T* out, const T* query, const T* key_cache,
                                    const T* value_cache, const int32_t* cu_seqlens_q,
                                    const int32_t* seq_lens_k, const int32_t* block_tables,
                                    float* workspace, int64_t num_seqs, int64_t num_heads,
                                    int64_t num_kv_heads, int64_t block_size,
                                    int64_t max_blocks_per_seq, int64_t query_stride, float scale,
                                    std::optional<int64_t> sliding_window,
                                    std::optional<int64_t> chunk_size, int num_splits,
                                    cudaStream_t stream);

// Batches with prefill tokens on tensor cores (sm_80+): FlashAttention-2's forward over the paged
// cache, see prefill_attention.cu. T is __half or __nv_bfloat16, HEAD_DIM 64 or 128; rows of query
// and the caches must be 16-byte aligned. Pointers and shapes are attention_launch's;
// max_seqlen_q bounds every sequence's q_len.
template <typename T, int HEAD_DIM>
cudaError_t prefill_attention_launch(T* out, const T* query, const T* key_cache,
                                     const T* value_cache, const int32_t* cu_seqlens_q,
                                     const int32_t* seq_lens_k, const int32_t* block_tables,
                                     int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                     int64_t block_size, int64_t max_blocks_per_seq,
                                     int64_t max_seqlen_q, int64_t query_stride, float scale,
                                     std::optional<int64_t> sliding_window,
                                     std::optional<int64_t> chunk_size, cudaStream_t stream);

}  // namespace fastgen::cuda
