// Every op's backend-independent argument checks (see op_checks.h). Host code only: compiled
// once, into the CPU-only and the CUDA builds alike, so the two backends cannot drift apart.
// The FASTGEN_CHECK_* macros print the argument's name as written, so parameters here are named
// as in the op schemas.
#include "core/op_checks.h"

#include <initializer_list>

#include <c10/util/Exception.h>

#include "core/checks.h"

namespace fastgen {

void check_rms_norm_args(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  constexpr const char* op = "rms_norm";
  FASTGEN_CHECK_DIM(op, input, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, out);
  FASTGEN_CHECK_CONTIGUOUS(op, weight);
  TORCH_CHECK(input.stride(1) == 1, op, ": input rows must be contiguous");
  TORCH_CHECK(out.sizes() == input.sizes(), op, ": out shape ", out.sizes(), " != input shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == input.size(1), op, ": weight must be [",
              input.size(1), "], got ", weight.sizes());
  FASTGEN_CHECK_SAME_DTYPE(op, out, input);
  FASTGEN_CHECK_SAME_DTYPE(op, weight, input);
  FASTGEN_CHECK_SAME_DEVICE(op, out, input);
  FASTGEN_CHECK_SAME_DEVICE(op, weight, input);
}

void check_fused_add_rms_norm_args(const at::Tensor& input, const at::Tensor& residual,
                                   const at::Tensor& weight) {
  constexpr const char* op = "fused_add_rms_norm";
  FASTGEN_CHECK_DIM(op, input, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, input);
  FASTGEN_CHECK_CONTIGUOUS(op, residual);
  FASTGEN_CHECK_CONTIGUOUS(op, weight);
  TORCH_CHECK(residual.sizes() == input.sizes(), op, ": residual shape ", residual.sizes(),
              " != input shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == input.size(1), op, ": weight must be [",
              input.size(1), "], got ", weight.sizes());
  FASTGEN_CHECK_SAME_DTYPE(op, residual, input);
  FASTGEN_CHECK_SAME_DTYPE(op, weight, input);
  FASTGEN_CHECK_SAME_DEVICE(op, residual, input);
  FASTGEN_CHECK_SAME_DEVICE(op, weight, input);
}

void check_silu_and_mul_args(const at::Tensor& out, const at::Tensor& input) {
  constexpr const char* op = "silu_and_mul";
  FASTGEN_CHECK_DIM(op, input, 2);
  FASTGEN_CHECK_DIM(op, out, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, out);
  TORCH_CHECK(input.stride(1) == 1, op, ": input rows must be contiguous");
  TORCH_CHECK(input.size(1) % 2 == 0, op, ": input must be [T, 2I], got odd last dim ",
              input.size(1));
  TORCH_CHECK(out.size(0) == input.size(0) && out.size(1) == input.size(1) / 2, op,
              ": out must be [", input.size(0), ", ", input.size(1) / 2, "], got ", out.sizes());
  FASTGEN_CHECK_SAME_DTYPE(op, out, input);
  FASTGEN_CHECK_SAME_DEVICE(op, out, input);
}

void check_rotary_embedding_args(const at::Tensor& positions, const at::Tensor& query,
                                 const at::Tensor& key, int64_t head_size,
                                 const at::Tensor& cos_sin_cache, const char* op) {
  FASTGEN_CHECK_DIM(op, positions, 1);
  FASTGEN_CHECK_DIM(op, query, 2);
  FASTGEN_CHECK_DIM(op, key, 2);
  FASTGEN_CHECK_DIM(op, cos_sin_cache, 2);
  FASTGEN_CHECK_DTYPE(op, positions, at::ScalarType::Long);
  FASTGEN_CHECK_DTYPE(op, cos_sin_cache, at::ScalarType::Float);
  FASTGEN_CHECK_SAME_DTYPE(op, key, query);
  FASTGEN_CHECK_SAME_DEVICE(op, key, query);
  FASTGEN_CHECK_SAME_DEVICE(op, positions, query);
  FASTGEN_CHECK_SAME_DEVICE(op, cos_sin_cache, query);
  FASTGEN_CHECK_CONTIGUOUS(op, positions);
  FASTGEN_CHECK_CONTIGUOUS(op, cos_sin_cache);
  TORCH_CHECK(query.stride(1) == 1 && key.stride(1) == 1, op,
              ": query and key rows must be contiguous, got strides ", query.strides(), " and ",
              key.strides());
  const int64_t num_tokens = positions.size(0);
  TORCH_CHECK(query.size(0) == num_tokens && key.size(0) == num_tokens, op, ": query ",
              query.sizes(), " and key ", key.sizes(), " must have ", num_tokens,
              " rows (one per position)");
  TORCH_CHECK(head_size > 0 && query.size(1) % head_size == 0 && key.size(1) % head_size == 0,
              op, ": head_size ", head_size, " must divide query width ", query.size(1),
              " and key width ", key.size(1));
  const int64_t rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(rot_dim % 2 == 0 && rot_dim <= head_size, op, ": cos_sin_cache width ", rot_dim,
              " must be even and <= head_size ", head_size);
}

void check_reshape_and_cache_args(const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& slot_mapping, const char* op) {
  FASTGEN_CHECK_DIM(op, key, 3);
  FASTGEN_CHECK_DIM(op, key_cache, 4);
  FASTGEN_CHECK_DIM(op, slot_mapping, 1);
  FASTGEN_CHECK_DTYPE(op, slot_mapping, at::ScalarType::Long);
  FASTGEN_CHECK_SAME_DTYPE(op, value, key);
  FASTGEN_CHECK_SAME_DTYPE(op, key_cache, key);
  FASTGEN_CHECK_SAME_DTYPE(op, value_cache, key);
  FASTGEN_CHECK_SAME_DEVICE(op, value, key);
  FASTGEN_CHECK_SAME_DEVICE(op, key_cache, key);
  FASTGEN_CHECK_SAME_DEVICE(op, value_cache, key);
  FASTGEN_CHECK_SAME_DEVICE(op, slot_mapping, key);
  FASTGEN_CHECK_CONTIGUOUS(op, key_cache);
  FASTGEN_CHECK_CONTIGUOUS(op, value_cache);
  FASTGEN_CHECK_CONTIGUOUS(op, slot_mapping);
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value shape ", value.sizes(),
              " != key shape ", key.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, ": value_cache shape ",
              value_cache.sizes(), " != key_cache shape ", key_cache.sizes());
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), head_size = key.size(2);
  TORCH_CHECK(key_cache.size(2) == num_kv_heads && key_cache.size(3) == head_size, op,
              ": caches must be [N, S, ", num_kv_heads, ", ", head_size, "], got ",
              key_cache.sizes());
  TORCH_CHECK(slot_mapping.size(0) == num_tokens, op, ": slot_mapping must be [", num_tokens,
              "], got ", slot_mapping.sizes());
  for (const at::Tensor* t : {&key, &value}) {
    TORCH_CHECK(t->stride(2) == 1 && (num_kv_heads == 1 || t->stride(1) == head_size), op,
                ": key and value must be [T, Hkv, D] with each token's [Hkv, D] contiguous, got "
                "strides ",
                t->strides());
  }
}

void check_rotary_embedding_and_cache_args(const at::Tensor& positions, const at::Tensor& query,
                                           const at::Tensor& key, const at::Tensor& value,
                                           int64_t head_size, const at::Tensor& cos_sin_cache,
                                           const at::Tensor& key_cache,
                                           const at::Tensor& value_cache,
                                           const at::Tensor& slot_mapping) {
  constexpr const char* op = "rotary_embedding_and_cache";
  check_rotary_embedding_args(positions, query, key, head_size, cos_sin_cache, op);
  FASTGEN_CHECK_DIM(op, value, 2);
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value shape ", value.sizes(),
              " != key shape ", key.sizes());
  const int64_t tokens = key.size(0), num_kv_heads = key.size(1) / head_size;
  check_reshape_and_cache_args(key.view({tokens, num_kv_heads, head_size}),
                               value.view({tokens, num_kv_heads, head_size}), key_cache,
                               value_cache, slot_mapping, op);
}

void check_attention_args(const at::Tensor& out, const at::Tensor& query,
                          const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                          const at::Tensor& block_tables, std::optional<int64_t> sliding_window,
                          std::optional<int64_t> chunk_size) {
  constexpr const char* op = "attention";
  FASTGEN_CHECK_DIM(op, query, 3);
  FASTGEN_CHECK_DIM(op, key_cache, 4);
  FASTGEN_CHECK_DIM(op, cu_seqlens_q, 1);
  FASTGEN_CHECK_DIM(op, seq_lens_k, 1);
  FASTGEN_CHECK_DIM(op, block_tables, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, out);
  FASTGEN_CHECK_CONTIGUOUS(op, key_cache);
  FASTGEN_CHECK_CONTIGUOUS(op, value_cache);
  FASTGEN_CHECK_CONTIGUOUS(op, cu_seqlens_q);
  FASTGEN_CHECK_CONTIGUOUS(op, seq_lens_k);
  FASTGEN_CHECK_CONTIGUOUS(op, block_tables);
  FASTGEN_CHECK_DTYPE(op, cu_seqlens_q, at::kInt);
  FASTGEN_CHECK_DTYPE(op, seq_lens_k, at::kInt);
  FASTGEN_CHECK_DTYPE(op, block_tables, at::kInt);
  FASTGEN_CHECK_SAME_DTYPE(op, out, query);
  FASTGEN_CHECK_SAME_DTYPE(op, key_cache, query);
  FASTGEN_CHECK_SAME_DTYPE(op, value_cache, query);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &out, &key_cache, &value_cache, &cu_seqlens_q, &seq_lens_k, &block_tables}) {
    TORCH_CHECK(t->device() == query.device(), op, ": every tensor must be on ", query.device(),
                " (the device of query), got one on ", t->device());
  }
  TORCH_CHECK(out.sizes() == query.sizes(), op, ": out shape ", out.sizes(), " != query shape ",
              query.sizes());
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2), op,
              ": each query row's [Hq, D] must be contiguous (only stride(0) may differ), got strides ",
              query.strides());
  TORCH_CHECK(key_cache.size(1) >= 1, op, ": key_cache block size must be >= 1, got shape ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, ": value_cache shape ",
              value_cache.sizes(), " != key_cache shape ", key_cache.sizes());
  TORCH_CHECK(key_cache.size(3) == query.size(2), op, ": key_cache head size ", key_cache.size(3),
              " != query head size ", query.size(2));
  TORCH_CHECK(key_cache.size(2) >= 1 && query.size(1) % key_cache.size(2) == 0, op, ": ",
              query.size(1), " query heads do not split into ", key_cache.size(2), " KV heads");
  const int64_t num_seqs = seq_lens_k.size(0);
  TORCH_CHECK(cu_seqlens_q.size(0) == num_seqs + 1, op, ": cu_seqlens_q must be [",
              num_seqs + 1, "] (seq_lens_k has ", num_seqs, " sequences), got ",
              cu_seqlens_q.sizes());
  TORCH_CHECK(block_tables.size(0) == num_seqs, op, ": block_tables must have ", num_seqs,
              " rows (one per sequence), got shape ", block_tables.sizes());
  TORCH_CHECK(!sliding_window || *sliding_window >= 1, op, ": sliding_window must be >= 1, got ",
              sliding_window.value_or(0));
  TORCH_CHECK(!chunk_size || *chunk_size >= 1, op, ": chunk_size must be >= 1, got ",
              chunk_size.value_or(0));
  TORCH_CHECK(query.size(0) == 0 || num_seqs >= 1, op, ": ", query.size(0),
              " query tokens but no sequences");
}

void check_linear_args(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "linear";
  FASTGEN_CHECK_DIM(op, input, 2);
  FASTGEN_CHECK_DIM(op, weight, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, weight);
  FASTGEN_CHECK_CONTIGUOUS(op, out);
  TORCH_CHECK(input.stride(1) == 1, op, ": input rows must be contiguous");
  const int64_t m = input.size(0), k = input.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, op, ": weight must be [O, ", k, "], got ", weight.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n, op, ": out must be [", m,
              ", ", n, "], got ", out.sizes());
  FASTGEN_CHECK_SAME_DTYPE(op, weight, input);
  TORCH_CHECK(out.scalar_type() == input.scalar_type() || out.scalar_type() == at::kFloat, op,
              ": out must be ", input.scalar_type(), " or float32, got ", out.scalar_type());
  if (bias) {
    FASTGEN_CHECK_SAME_DTYPE(op, *bias, input);
    FASTGEN_CHECK_CONTIGUOUS(op, *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [", n, "], got ",
                bias->sizes());
  }
}

}  // namespace fastgen
