// Every op's backend-independent argument checks, written once: ranks, shapes, dtypes,
// contiguity, devices and optional arguments, i.e. everything that can be checked without reading
// a tensor's data. Each tensor adapter (csrc/cpu/<family>.cpp, csrc/cuda/<family>.cu) calls its
// op's check first, then adds only what is specific to its backend: the CPU adapters check the
// values they can read on the host (positions, slots, attention metadata: the value checks at the
// end, written once here too), the CUDA adapters launch limits and the device guard. Defined in
// op_checks.cpp, compiled once by the host compiler.
// A failed check throws c10::Error with a message naming the op, the argument and what it got.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "core/moe.h"

namespace fastgen {

// rms_norm: input [T, H] with contiguous rows, out [T, H] and weight [H] contiguous, one dtype,
// one device.
void check_rms_norm_args(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight);

// fused_add_rms_norm: input and residual [T, H] contiguous, weight [H] contiguous, one dtype,
// one device.
void check_fused_add_rms_norm_args(const at::Tensor& input, const at::Tensor& residual,
                                   const at::Tensor& weight);

// silu_and_mul: input [T, 2I] with contiguous rows, out [T, I] contiguous, one dtype, one device.
void check_silu_and_mul_args(const at::Tensor& out, const at::Tensor& input);

// rotary_embedding: positions [T] int64, query [T, Hq * D] and key [T, Hkv * D] with contiguous
// rows and one dtype, head_size D dividing both widths, cos_sin_cache [max_position, rot_dim]
// float32 with rot_dim even and <= D, one device. Positions' values are not read.
void check_rotary_embedding_args(const at::Tensor& positions, const at::Tensor& query,
                                 const at::Tensor& key, int64_t head_size,
                                 const at::Tensor& cos_sin_cache,
                                 const char* op = "rotary_embedding");

// reshape_and_cache: key and value [T, Hkv, D] with each token's [Hkv, D] contiguous, caches
// [N, S, Hkv, D] contiguous, slot_mapping [T] int64, one dtype, one device. Slots' values are
// not read. (rotary_embedding_and_cache runs both checks under its own name.)
void check_reshape_and_cache_args(const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& slot_mapping,
                                  const char* op = "reshape_and_cache");

// rotary_embedding_and_cache: rotary_embedding's checks for (positions, query, key), and
// reshape_and_cache's for key and value viewed as [T, Hkv, D] (value shaped like key); the q/k
// norm weights both or neither, each a contiguous [head_size] of query's dtype and device.
void check_rotary_embedding_and_cache_args(const at::Tensor& positions, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value,
                                           int64_t head_size, const at::Tensor& cos_sin_cache,
                                           const at::Tensor& key_cache,
                                           const at::Tensor& value_cache,
                                           const at::Tensor& slot_mapping,
                                           const std::optional<at::Tensor>& q_norm_weight,
                                           const std::optional<at::Tensor>& k_norm_weight);

// mla_rotary_and_cache: positions [T] int64, query [T, H * head_size] and kv_a [T, L + R] with
// contiguous rows, cos_sin_cache [P, R] float32 (R even, <= head_size), latent_cache [N, S, L + R]
// contiguous, kv_norm_weight [L], slot_mapping [T] int64; one dtype and device.
void check_mla_rotary_and_cache_args(const at::Tensor& positions, const at::Tensor& query,
                                     const at::Tensor& kv_a, const at::Tensor& kv_norm_weight,
                                     int64_t head_size, const at::Tensor& cos_sin_cache,
                                     const at::Tensor& latent_cache,
                                     const at::Tensor& slot_mapping);

// attention: query and out [T, Hq, D] (query rows may be strided), caches [N, S, Hkv, D]
// contiguous with Hkv dividing Hq, int32 metadata cu_seqlens_q [B + 1], seq_lens_k [B] and
// block_tables [B, max_blocks], a sequence for any query token, sliding_window and chunk_size
// >= 1 when given, one dtype for the data, one device. The metadata's values are not read.
void check_attention_args(const at::Tensor& out, const at::Tensor& query,
                          const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                          const at::Tensor& block_tables, std::optional<int64_t> sliding_window,
                          std::optional<int64_t> chunk_size);

// mla_attention: attention's checks with latent_cache [N, S, L + R] as its one KV head's keys and
// values, and out [T, H, L] (1 <= L < L + R) contiguous, of query's dtype and device.
void check_mla_attention_args(const at::Tensor& out, const at::Tensor& query,
                              const at::Tensor& latent_cache, const at::Tensor& cu_seqlens_q,
                              const at::Tensor& seq_lens_k, const at::Tensor& block_tables);

// linear (CPU only): input [M, K] with contiguous rows, weight [N, K] contiguous and of input's
// dtype, out [M, N] contiguous in input's dtype or float32, bias [N] contiguous in input's dtype
// when given. (No device check: with no CUDA kernel, only CPU tensors reach it.)
void check_linear_args(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias);

// quant_linear: input [M, K] float with contiguous rows, K a multiple of qtype's super-block,
// packed uint8 contiguous [ceil(n / 16), K / SB, chunk_bytes], out [M, n] of input's dtype or
// float32 with contiguous rows, bias [n] float32 contiguous when given, qtype supported.
void check_quant_linear_args(const at::Tensor& out, const at::Tensor& input,
                             const at::Tensor& packed, int64_t qtype, int64_t n,
                             const std::optional<at::Tensor>& bias);
// quant_dequantize: out [R, K] float contiguous, packed as quant_linear's for some n (rows int64
// [R] contiguous in [0, 16 * tiles) when given, else R = 16 * tiles at most).
void check_quant_dequantize_args(const at::Tensor& out, const at::Tensor& packed, int64_t qtype,
                                 const std::optional<at::Tensor>& rows);

// moe_route: router_logits [T, E] float32 with contiguous rows, topk_weights [T, k] float32 and
// topk_ids [T, k] int32 contiguous with 1 <= k <= E, scoring "softmax" or "sigmoid",
// group_scoring "max" or "sum_top2", num_groups and topk_groups both given or both not, with
// num_groups dividing E, 1 <= topk_groups <= num_groups, k <= the kept groups' experts and (for
// sum_top2) groups of >= 2 experts, correction_bias [E] float32 contiguous when given, one device.
// Returns the routing configuration the launchers take.
MoeRouting check_moe_route_args(const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                const at::Tensor& router_logits, std::string_view scoring,
                                bool renormalize, std::optional<int64_t> num_groups,
                                std::optional<int64_t> topk_groups,
                                std::string_view group_scoring,
                                const std::optional<at::Tensor>& correction_bias, double scale);

// moe_align: topk_ids [T, k] int32 contiguous, expert_offsets [E + 1] int32 (E >= 1),
// block_size >= 1, sorted_ids [moe_max_padded_pairs(T * k, E, block_size)] and tile_experts
// [moe_max_tiles(...)] int32, all contiguous, one device. The ids' values are not read.
void check_moe_align_args(const at::Tensor& sorted_ids, const at::Tensor& expert_offsets,
                          const at::Tensor& tile_experts, const at::Tensor& topk_ids,
                          int64_t block_size);

// fused_moe: x [T, H], w13 [E, 2I, H], w2 [E, H, I] and out [T, H] contiguous and of one dtype,
// topk_weights [T, k] float32 and topk_ids [T, k] int32 contiguous (k >= 1), one device. The ids'
// values are not read.
void check_fused_moe_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w13,
                          const at::Tensor& w2, const at::Tensor& topk_weights,
                          const at::Tensor& topk_ids);

// Value checks, for host tensors only (they read the data; the kernels trust it). Each runs after
// its op's argument check above.

// slot_mapping [T] int64: every slot < num_slots (negative slots are padding).
void check_slot_values(const char* op, const at::Tensor& slot_mapping, int64_t num_slots);

// positions [T] int64: every position in [0, max_position), the rows of cos_sin_cache.
void check_position_values(const char* op, const at::Tensor& positions, int64_t max_position);

// attention's metadata: cu_seqlens_q runs from 0 to the number of query tokens and never
// decreases; each sequence has q_len <= k_len <= block_tables width x block size, within
// max_seqlen_q / max_seqlen_k; the block ids of its pages are cache blocks. op names the op in
// the errors.
void check_attention_metadata_values(const at::Tensor& query, const at::Tensor& key_cache,
                                     const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                                     const at::Tensor& block_tables, int64_t max_seqlen_q,
                                     int64_t max_seqlen_k, const char* op = "attention");

}  // namespace fastgen
