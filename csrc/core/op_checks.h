// Every op's backend-independent argument checks, written once: ranks, shapes, dtypes,
// contiguity, devices and optional arguments, i.e. everything that can be checked without reading
// a tensor's data. Each tensor adapter (csrc/cpu/<family>.cpp, csrc/cuda/<family>.cu) calls its
// op's check first, then adds only what is specific to its backend: the CPU adapters check values
// they can read on the host (positions, slots, attention metadata), the CUDA adapters launch
// limits and the device guard. Defined in op_checks.cpp, compiled once by the host compiler.
// A failed check throws c10::Error with a message naming the op, the argument and what it got.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

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
// reshape_and_cache's for key and value viewed as [T, Hkv, D] (value shaped like key).
void check_rotary_embedding_and_cache_args(const at::Tensor& positions, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value,
                                           int64_t head_size, const at::Tensor& cos_sin_cache,
                                           const at::Tensor& key_cache,
                                           const at::Tensor& value_cache,
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

// linear (CPU only): input [M, K] with contiguous rows, weight [N, K] contiguous and of input's
// dtype, out [M, N] contiguous in input's dtype or float32, bias [N] contiguous in input's dtype
// when given. (No device check: with no CUDA kernel, only CPU tensors reach it.)
void check_linear_args(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias);

}  // namespace fastgen
