// Paged causal attention's torch-free CUDA launchers: raw device pointers, sizes and a stream in, a
// cudaError_t out. attention_launch is the op's whole GPU path: it picks the kernel a batch takes
// and launches it; the adapter in attention.cu calls it with torch's current stream, and so does
// the microbenchmark in bench/kernels, so the benchmark times what the op runs. The kernels'
// own launchers below are its parts. Semantics (the contract) are in the `attention` schema in
// csrc/torch_bindings.cpp.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>

#include <cuda_runtime.h>

#include "core/dtype.h"

namespace fastgen::cuda {

// The kernels a batch can take.
enum class AttentionKernel {
  kDecode,      // split-KV decode (decode_attention.cu)
  kTensorCore,  // FlashAttention-2 prefill on tensor cores (prefill_attention.cu)
  kPlain,       // one CTA per (query token, head) (attention.cu)
};
const char* attention_kernel_name(AttentionKernel kernel);  // "decode", "tensor cores", "plain"

// DeepSeek MLA's absorbed attention: one latent cache row (kv_lora_rank 512 + rope 64) as the
// key and the value of one KV head.
inline constexpr int kLatentHeadDim = 576;

// Whether attention_launch has kernels for a head size (64, 128, 256 or kLatentHeadDim).
bool attention_head_dim_supported(int64_t head_dim);

// Attention for a batch through the kernel it should take, on the current device:
//   decode steps (max_seqlen_q == 1)                      the split-KV decode kernel
//   other bf16 / fp16 batches, head size 64 or 128, sm_80+ the tensor-core prefill kernel
//   the rest (float32, head size 256)                      the plain kernel
// The first two read query and cache rows with 16-byte loads, so misaligned views (query,
// key_cache, value_cache or query rows not 16-byte aligned) take the plain kernel too, as does
// everything when the environment sets FASTGEN_ATTENTION_KERNELS=plain (for bisecting a wrong
// result). The decode kernel may need a float32 workspace: workspace(n) is then asked once for n
// floats, which must stay valid until the kernels have run (the op takes them from torch's
// caching allocator, so a CUDA graph capture gets them from its pool). *launched, when given,
// is set to the kernel that ran. Returns cudaErrorInvalidValue for a head size without kernels.
// The metadata must be well formed (it is on the device, so the adapter cannot check it without
// a sync): cu_seqlens_q non-decreasing from 0 to num_tokens, q_len <= seq_lens_k[b] <=
// max_blocks_per_seq * block_size, block ids < num_blocks, and max_seqlen_q / max_seqlen_k
// bounding every q_len / seq_lens_k[b].
cudaError_t attention_launch(void* out,                    // [num_tokens, num_heads, head_dim]
                             const void* query,            // [num_tokens, num_heads, head_dim],
                                                           //   rows query_stride apart
                             const void* key_cache,        // [num_blocks, block_size, num_kv_heads, head_dim]
                             const void* value_cache,      // [num_blocks, block_size, num_kv_heads, head_dim]
                             const int32_t* cu_seqlens_q,  // [num_seqs + 1]
                             const int32_t* seq_lens_k,    // [num_seqs]
                             const int32_t* block_tables,  // [num_seqs, max_blocks_per_seq]
                             DType dtype, int64_t num_tokens, int64_t num_seqs, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             int64_t max_blocks_per_seq, int64_t max_seqlen_q,
                             int64_t max_seqlen_k, int64_t query_stride, float scale,
                             std::optional<int64_t> sliding_window,
                             std::optional<int64_t> chunk_size,
                             const std::function<float*(int64_t)>& workspace, cudaStream_t stream,
                             AttentionKernel* launched = nullptr);

// ---- the kernels' launchers (T is float, __half or __nv_bfloat16; pointers and shapes are
// attention_launch's, typed) -----------------------------------------------------------------

// The plain kernel, any batch (attention.cu). HEAD_DIM is 64, 128, 256 or kLatentHeadDim.
template <typename T, int HEAD_DIM>
cudaError_t plain_attention_launch(T* out, const T* query, const T* key_cache, const T* value_cache,
                                   const int32_t* cu_seqlens_q, const int32_t* seq_lens_k,
                                   const int32_t* block_tables, int64_t num_tokens,
                                   int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                   int64_t block_size, int64_t max_blocks_per_seq,
                                   int64_t query_stride, float scale,
                                   std::optional<int64_t> sliding_window,
                                   std::optional<int64_t> chunk_size, cudaStream_t stream);

// The decode special case (every sequence has at most one query, the last of its cached keys):
// split-KV attention, see decode_attention.cu. num_splits comes from decode_attention_num_splits
// (an upper bound on the context is enough; sequences use only the splits their length needs),
// and workspace holds decode_attention_workspace_floats(...) floats (none when num_splits is 1).
// A sequence with no visible key (seq_lens_k[b] == 0: a CUDA graph's padding row) gets zeros.
// cu_seqlens_q steps by 0 or 1.
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
// and the caches must be 16-byte aligned. max_seqlen_q bounds every sequence's q_len.
template <typename T, int HEAD_DIM>
cudaError_t prefill_attention_launch(T* out, const T* query, const T* key_cache,
                                     const T* value_cache, const int32_t* cu_seqlens_q,
                                     const int32_t* seq_lens_k, const int32_t* block_tables,
                                     int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                     int64_t block_size, int64_t max_blocks_per_seq,
                                     int64_t max_seqlen_q, int64_t query_stride, float scale,
                                     std::optional<int64_t> sliding_window,
                                     std::optional<int64_t> chunk_size, cudaStream_t stream);

// MLA's absorbed decode (mla_decode.cu): every sequence has at most one query, the last of its
// k_len cached rows; all heads attend over the latent rows of kLatentHeadDim (the keys), whose
// first 512 elements are the values; out rows are 512 wide. Split-KV like decode_attention_launch,
// with num_splits from mla_decode_num_splits and workspace of mla_decode_workspace_floats(...)
// floats (none for one split). query rows and the cache must be 16-byte aligned.
int mla_decode_num_splits(int64_t num_seqs, int64_t num_heads, int64_t max_seqlen_k, int num_sms);
int64_t mla_decode_workspace_floats(int64_t num_seqs, int64_t num_heads, int num_splits);
template <typename T>
cudaError_t mla_decode_launch(T* out,                       // [num_tokens, num_heads, 512]
                              const T* query,               // [num_tokens, num_heads, 576]
                              const T* latent_cache,        // [num_blocks, block_size, 576]
                              const int32_t* cu_seqlens_q,  // [num_seqs + 1]
                              const int32_t* seq_lens_k,    // [num_seqs]
                              const int32_t* block_tables,  // [num_seqs, max_blocks_per_seq]
                              float* workspace, int64_t num_seqs, int64_t num_heads,
                              int64_t block_size, int64_t max_blocks_per_seq, int64_t query_stride,
                              float scale, int num_splits, cudaStream_t stream);

}  // namespace fastgen::cuda
