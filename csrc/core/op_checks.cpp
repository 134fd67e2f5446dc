// Every op's backend-independent argument checks (see op_checks.h). Host code only: compiled
// once, into the CPU-only and the CUDA builds alike, so the two backends cannot drift apart.
// The FASTGEN_CHECK_* macros print the argument's name as written, so parameters here are named
// as in the op schemas.
#include "core/op_checks.h"

#include <cstdint>
#include <initializer_list>
#include <string>

#include <c10/util/Exception.h>

#include "core/checks.h"
#include "core/quant_format.h"

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
                                           const at::Tensor& slot_mapping,
                                           const std::optional<at::Tensor>& q_norm_weight,
                                           const std::optional<at::Tensor>& k_norm_weight) {
  constexpr const char* op = "rotary_embedding_and_cache";
  check_rotary_embedding_args(positions, query, key, head_size, cos_sin_cache, op);
  FASTGEN_CHECK_DIM(op, value, 2);
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value shape ", value.sizes(),
              " != key shape ", key.sizes());
  const int64_t tokens = key.size(0), num_kv_heads = key.size(1) / head_size;
  check_reshape_and_cache_args(key.view({tokens, num_kv_heads, head_size}),
                               value.view({tokens, num_kv_heads, head_size}), key_cache,
                               value_cache, slot_mapping, op);
  TORCH_CHECK(q_norm_weight.has_value() == k_norm_weight.has_value(), op,
              ": q_norm_weight and k_norm_weight are given together or not at all");
  for (const auto* weight : {&q_norm_weight, &k_norm_weight}) {
    if (!weight->has_value()) continue;
    const at::Tensor& norm_weight = **weight;
    TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == head_size, op,
                ": a q/k norm weight must be [", head_size, "], got ", norm_weight.sizes());
    FASTGEN_CHECK_CONTIGUOUS(op, norm_weight);
    FASTGEN_CHECK_SAME_DTYPE(op, norm_weight, query);
    FASTGEN_CHECK_SAME_DEVICE(op, norm_weight, query);
  }
}

void check_mla_rotary_and_cache_args(const at::Tensor& positions, const at::Tensor& query,
                                     const at::Tensor& kv_a, const at::Tensor& kv_norm_weight,
                                     int64_t head_size, const at::Tensor& cos_sin_cache,
                                     const at::Tensor& latent_cache,
                                     const at::Tensor& slot_mapping) {
  constexpr const char* op = "mla_rotary_and_cache";
  FASTGEN_CHECK_DIM(op, positions, 1);
  FASTGEN_CHECK_DIM(op, query, 2);
  FASTGEN_CHECK_DIM(op, kv_a, 2);
  FASTGEN_CHECK_DIM(op, kv_norm_weight, 1);
  FASTGEN_CHECK_DIM(op, cos_sin_cache, 2);
  FASTGEN_CHECK_DIM(op, latent_cache, 3);
  FASTGEN_CHECK_DIM(op, slot_mapping, 1);
  FASTGEN_CHECK_DTYPE(op, positions, at::ScalarType::Long);
  FASTGEN_CHECK_DTYPE(op, slot_mapping, at::ScalarType::Long);
  FASTGEN_CHECK_DTYPE(op, cos_sin_cache, at::ScalarType::Float);
  FASTGEN_CHECK_SAME_DTYPE(op, kv_a, query);
  FASTGEN_CHECK_SAME_DTYPE(op, kv_norm_weight, query);
  FASTGEN_CHECK_SAME_DTYPE(op, latent_cache, query);
  for (const at::Tensor* t : {&positions, &kv_a, &kv_norm_weight, &cos_sin_cache, &latent_cache,
                              &slot_mapping}) {
    TORCH_CHECK(t->device() == query.device(), op, ": every tensor must be on ", query.device(),
                ", got one on ", t->device());
  }
  FASTGEN_CHECK_CONTIGUOUS(op, positions);
  FASTGEN_CHECK_CONTIGUOUS(op, slot_mapping);
  FASTGEN_CHECK_CONTIGUOUS(op, cos_sin_cache);
  FASTGEN_CHECK_CONTIGUOUS(op, kv_norm_weight);
  FASTGEN_CHECK_CONTIGUOUS(op, latent_cache);
  TORCH_CHECK(query.stride(1) == 1 && kv_a.stride(1) == 1, op,
              ": query and kv_a rows must be contiguous, got strides ", query.strides(), " and ",
              kv_a.strides());
  const int64_t tokens = positions.size(0);
  TORCH_CHECK(query.size(0) == tokens && kv_a.size(0) == tokens && slot_mapping.size(0) == tokens,
              op, ": query ", query.sizes(), ", kv_a ", kv_a.sizes(), " and slot_mapping ",
              slot_mapping.sizes(), " must have ", tokens, " rows (one per position)");
  TORCH_CHECK(head_size > 0 && query.size(1) % head_size == 0, op, ": head_size ", head_size,
              " must divide the query width ", query.size(1));
  const int64_t rot_dim = cos_sin_cache.size(1), row = latent_cache.size(2);
  TORCH_CHECK(rot_dim % 2 == 0 && rot_dim <= head_size, op, ": cos_sin_cache width ", rot_dim,
              " must be even and <= head_size ", head_size);
  TORCH_CHECK(kv_a.size(1) == row && row > rot_dim, op, ": kv_a width ", kv_a.size(1),
              " must equal the latent cache row ", row, " (latent + ", rot_dim, " rotary dims)");
  TORCH_CHECK(kv_norm_weight.size(0) == row - rot_dim, op, ": kv_norm_weight must be [",
              row - rot_dim, "], got ", kv_norm_weight.sizes());
}

namespace {

// What attention and mla_attention share: query [T, Hq, D] with contiguous rows, caches
// [N, S, Hkv, D] of query's dtype and device, the metadata's shapes and dtypes.
void check_paged_attention_inputs(const char* op, const at::Tensor& query,
                                  const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                                  const at::Tensor& block_tables) {
  FASTGEN_CHECK_DIM(op, query, 3);
  FASTGEN_CHECK_DIM(op, key_cache, 4);
  FASTGEN_CHECK_DIM(op, cu_seqlens_q, 1);
  FASTGEN_CHECK_DIM(op, seq_lens_k, 1);
  FASTGEN_CHECK_DIM(op, block_tables, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, key_cache);
  FASTGEN_CHECK_CONTIGUOUS(op, value_cache);
  FASTGEN_CHECK_CONTIGUOUS(op, cu_seqlens_q);
  FASTGEN_CHECK_CONTIGUOUS(op, seq_lens_k);
  FASTGEN_CHECK_CONTIGUOUS(op, block_tables);
  FASTGEN_CHECK_DTYPE(op, cu_seqlens_q, at::kInt);
  FASTGEN_CHECK_DTYPE(op, seq_lens_k, at::kInt);
  FASTGEN_CHECK_DTYPE(op, block_tables, at::kInt);
  FASTGEN_CHECK_SAME_DTYPE(op, key_cache, query);
  FASTGEN_CHECK_SAME_DTYPE(op, value_cache, query);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &key_cache, &value_cache, &cu_seqlens_q, &seq_lens_k, &block_tables}) {
    TORCH_CHECK(t->device() == query.device(), op, ": every tensor must be on ", query.device(),
                " (the device of query), got one on ", t->device());
  }
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
  TORCH_CHECK(query.size(0) == 0 || num_seqs >= 1, op, ": ", query.size(0),
              " query tokens but no sequences");
}

void check_attention_out(const char* op, const at::Tensor& out, const at::Tensor& query,
                         int64_t value_dim) {
  FASTGEN_CHECK_CONTIGUOUS(op, out);
  FASTGEN_CHECK_SAME_DTYPE(op, out, query);
  TORCH_CHECK(out.device() == query.device(), op, ": every tensor must be on ", query.device(),
              " (the device of query), got one on ", out.device());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == query.size(0) && out.size(1) == query.size(1) &&
                  out.size(2) == value_dim,
              op, ": out must be [", query.size(0), ", ", query.size(1), ", ", value_dim,
              "], got ", out.sizes());
}

}  // namespace

void check_attention_args(const at::Tensor& out, const at::Tensor& query,
                          const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                          const at::Tensor& block_tables, std::optional<int64_t> sliding_window,
                          std::optional<int64_t> chunk_size) {
  constexpr const char* op = "attention";
  check_paged_attention_inputs(op, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k,
                               block_tables);
  check_attention_out(op, out, query, query.size(2));
  TORCH_CHECK(!sliding_window || *sliding_window >= 1, op, ": sliding_window must be >= 1, got ",
              sliding_window.value_or(0));
  TORCH_CHECK(!chunk_size || *chunk_size >= 1, op, ": chunk_size must be >= 1, got ",
              chunk_size.value_or(0));
}

void check_mla_attention_args(const at::Tensor& out, const at::Tensor& query,
                              const at::Tensor& latent_cache, const at::Tensor& cu_seqlens_q,
                              const at::Tensor& seq_lens_k, const at::Tensor& block_tables) {
  constexpr const char* op = "mla_attention";
  FASTGEN_CHECK_DIM(op, latent_cache, 3);
  FASTGEN_CHECK_DIM(op, out, 3);
  const at::Tensor rows = latent_cache.unsqueeze(2);  // one KV head
  check_paged_attention_inputs(op, query, rows, rows, cu_seqlens_q, seq_lens_k, block_tables);
  TORCH_CHECK(out.size(2) >= 1 && out.size(2) < query.size(2), op, ": out's last dim (the latent "
              "size L) must be in [1, ", query.size(2), ") (a row is L + R wide), got ", out.size(2));
  check_attention_out(op, out, query, out.size(2));
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

namespace {

void check_packed(const char* op, const at::Tensor& packed, int64_t qtype, int64_t k,
                  int64_t n) {
  TORCH_CHECK(quant::is_supported(qtype), op, ": unsupported quantization type ", qtype,
              " (supported GGML types: 2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, 13 Q5_K, 14 Q6_K)");
  const quant::Format f = quant::format_of(static_cast<quant::QType>(qtype));
  FASTGEN_CHECK_DTYPE(op, packed, at::kByte);
  FASTGEN_CHECK_CONTIGUOUS(op, packed);
  TORCH_CHECK(k % f.super_elems == 0, op, ": K (", k, ") must be a multiple of ",
              quant::name_of(static_cast<quant::QType>(qtype)), "'s block of ", f.super_elems);
  const int64_t tiles = (n + quant::kTileRows - 1) / quant::kTileRows;
  TORCH_CHECK(packed.dim() == 3 && packed.size(0) == tiles && packed.size(1) == k / f.super_elems &&
                  packed.size(2) == f.chunk_bytes(),
              op, ": packed must be [", tiles, ", ", k / f.super_elems, ", ", f.chunk_bytes(),
              "] for ", n, " rows of ", k, " ", quant::name_of(static_cast<quant::QType>(qtype)),
              " weights, got ", packed.sizes());
}

}  // namespace

void check_quant_linear_args(const at::Tensor& out, const at::Tensor& input,
                             const at::Tensor& packed, int64_t qtype, int64_t n,
                             const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "quant_linear";
  FASTGEN_CHECK_DIM(op, input, 2);
  FASTGEN_CHECK_DIM(op, out, 2);
  TORCH_CHECK(input.stride(1) == 1 && out.stride(1) == 1, op, ": input and out rows must be contiguous");
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  const int64_t m = input.size(0), k = input.size(1);
  check_packed(op, packed, qtype, k, n);
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, op, ": out must be [", m, ", ", n, "], got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == input.scalar_type() || out.scalar_type() == at::kFloat, op,
              ": out must be ", input.scalar_type(), " or float32, got ", out.scalar_type());
  FASTGEN_CHECK_SAME_DEVICE(op, packed, input);
  FASTGEN_CHECK_SAME_DEVICE(op, out, input);
  if (bias) {
    FASTGEN_CHECK_DTYPE(op, *bias, at::kFloat);
    FASTGEN_CHECK_CONTIGUOUS(op, *bias);
    FASTGEN_CHECK_SAME_DEVICE(op, *bias, input);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [", n, "], got ",
                bias->sizes());
  }
}

void check_quant_dequantize_args(const at::Tensor& out, const at::Tensor& packed, int64_t qtype,
                                 const std::optional<at::Tensor>& rows) {
  constexpr const char* op = "quant_dequantize";
  FASTGEN_CHECK_DIM(op, out, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, out);
  TORCH_CHECK(packed.dim() == 3, op, ": packed must be [tiles, K / SB, chunk_bytes], got ",
              packed.sizes());
  const int64_t capacity = packed.size(0) * quant::kTileRows;
  check_packed(op, packed, qtype, out.size(1), capacity);
  FASTGEN_CHECK_SAME_DEVICE(op, out, packed);
  if (rows) {
    FASTGEN_CHECK_DTYPE(op, *rows, at::kLong);
    FASTGEN_CHECK_CONTIGUOUS(op, *rows);
    FASTGEN_CHECK_SAME_DEVICE(op, *rows, packed);
    TORCH_CHECK(rows->dim() == 1 && rows->size(0) == out.size(0), op, ": rows must be [",
                out.size(0), "], got ", rows->sizes());
    if (rows->device().is_cpu()) {
      const int64_t* r = rows->data_ptr<int64_t>();
      for (int64_t i = 0; i < rows->size(0); ++i)
        TORCH_CHECK(r[i] >= 0 && r[i] < capacity, op, ": row ", r[i], " is out of range [0, ",
                    capacity, ")");
    }
  } else {
    TORCH_CHECK(out.size(0) <= capacity, op, ": out has ", out.size(0), " rows, packed holds ",
                capacity);
  }
}

MoeRouting check_moe_route_args(const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                const at::Tensor& router_logits, std::string_view scoring,
                                bool renormalize, std::optional<int64_t> num_groups,
                                std::optional<int64_t> topk_groups,
                                std::string_view group_scoring,
                                const std::optional<at::Tensor>& correction_bias, double scale) {
  constexpr const char* op = "moe_route";
  FASTGEN_CHECK_DIM(op, router_logits, 2);
  FASTGEN_CHECK_DIM(op, topk_weights, 2);
  FASTGEN_CHECK_DTYPE(op, router_logits, at::kFloat);
  FASTGEN_CHECK_DTYPE(op, topk_weights, at::kFloat);
  FASTGEN_CHECK_DTYPE(op, topk_ids, at::kInt);
  FASTGEN_CHECK_CONTIGUOUS(op, topk_weights);
  FASTGEN_CHECK_CONTIGUOUS(op, topk_ids);
  FASTGEN_CHECK_SAME_DEVICE(op, topk_weights, router_logits);
  FASTGEN_CHECK_SAME_DEVICE(op, topk_ids, router_logits);
  TORCH_CHECK(router_logits.stride(1) == 1, op, ": router_logits rows must be contiguous");
  const int64_t num_tokens = router_logits.size(0), num_experts = router_logits.size(1);
  const int64_t top_k = topk_weights.size(1);
  TORCH_CHECK(topk_weights.size(0) == num_tokens, op, ": topk_weights must have ", num_tokens,
              " rows (one per token of router_logits), got shape ", topk_weights.sizes());
  TORCH_CHECK(topk_ids.sizes() == topk_weights.sizes(), op, ": topk_ids shape ", topk_ids.sizes(),
              " != topk_weights shape ", topk_weights.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, op, ": top_k must be in [1, ", num_experts,
              "] (the number of experts), got ", top_k);
  MoeRouting routing{num_experts, top_k, MoeScoring::kSoftmax, renormalize, 1, 1,
                     MoeGroupScoring::kMax, static_cast<float>(scale)};
  if (scoring == "sigmoid") {
    routing.scoring = MoeScoring::kSigmoid;
  } else {
    TORCH_CHECK(scoring == "softmax", op, ": scoring must be \"softmax\" or \"sigmoid\", got \"",
                scoring, "\"");
  }
  if (group_scoring == "sum_top2") {
    routing.group_scoring = MoeGroupScoring::kSumTop2;
  } else {
    TORCH_CHECK(group_scoring == "max", op, ": group_scoring must be \"max\" or \"sum_top2\", got \"",
                group_scoring, "\"");
  }
  TORCH_CHECK(num_groups.has_value() == topk_groups.has_value(), op,
              ": num_groups and topk_groups must be given together, got num_groups ",
              num_groups ? std::to_string(*num_groups) : "None", " and topk_groups ",
              topk_groups ? std::to_string(*topk_groups) : "None");
  if (num_groups) {
    TORCH_CHECK(*num_groups >= 1 && num_experts % *num_groups == 0, op, ": num_groups ",
                *num_groups, " must divide the ", num_experts, " experts");
    TORCH_CHECK(*topk_groups >= 1 && *topk_groups <= *num_groups, op, ": topk_groups must be in [1, ",
                *num_groups, "] (num_groups), got ", *topk_groups);
    const int64_t group_size = num_experts / *num_groups;
    TORCH_CHECK(top_k <= *topk_groups * group_size, op, ": top_k ", top_k, " is more than the ",
                *topk_groups * group_size, " experts of the ", *topk_groups, " kept groups");
    TORCH_CHECK(routing.group_scoring != MoeGroupScoring::kSumTop2 || group_size >= 2, op,
                ": group_scoring \"sum_top2\" needs groups of >= 2 experts, got ", group_size);
    routing.num_groups = *num_groups;
    routing.topk_groups = *topk_groups;
  }
  if (correction_bias) {
    const at::Tensor& bias = *correction_bias;
    TORCH_CHECK(bias.scalar_type() == at::kFloat, op, ": correction_bias must be Float, got ",
                bias.scalar_type());
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == num_experts && bias.is_contiguous(), op,
                ": correction_bias must be [", num_experts, "] and contiguous, got ", bias.sizes());
    TORCH_CHECK(bias.device() == router_logits.device(), op, ": correction_bias must be on ",
                router_logits.device(), " (the device of router_logits), got ", bias.device());
  }
  return routing;
}

void check_moe_align_args(const at::Tensor& sorted_ids, const at::Tensor& expert_offsets,
                          const at::Tensor& tile_experts, const at::Tensor& topk_ids,
                          int64_t block_size) {
  constexpr const char* op = "moe_align";
  FASTGEN_CHECK_DIM(op, topk_ids, 2);
  FASTGEN_CHECK_DIM(op, sorted_ids, 1);
  FASTGEN_CHECK_DIM(op, expert_offsets, 1);
  FASTGEN_CHECK_DIM(op, tile_experts, 1);
  for (const at::Tensor* t : {&sorted_ids, &expert_offsets, &tile_experts, &topk_ids}) {
    TORCH_CHECK(t->scalar_type() == at::kInt, op, ": every tensor must be int32, got ",
                t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": every tensor must be contiguous");
    TORCH_CHECK(t->device() == topk_ids.device(), op, ": every tensor must be on ",
                topk_ids.device(), " (the device of topk_ids), got one on ", t->device());
  }
  TORCH_CHECK(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
  const int64_t num_experts = expert_offsets.size(0) - 1;
  TORCH_CHECK(num_experts >= 1, op, ": expert_offsets must be [E + 1] with E >= 1, got ",
              expert_offsets.sizes());
  const int64_t num_pairs = topk_ids.numel();
  const int64_t padded = moe_max_padded_pairs(num_pairs, num_experts, block_size);
  const int64_t tiles = moe_max_tiles(num_pairs, num_experts, block_size);
  TORCH_CHECK(sorted_ids.size(0) == padded, op, ": sorted_ids must be [", padded, "] (T * k + E * (",
              "block_size - 1)), got ", sorted_ids.sizes());
  TORCH_CHECK(tile_experts.size(0) == tiles, op, ": tile_experts must be [", tiles,
              "] (sorted_ids' tiles of block_size), got ", tile_experts.sizes());
  TORCH_CHECK(padded <= INT32_MAX, op, ": ", padded, " padded pairs do not fit int32 ids");
}

void check_fused_moe_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w13,
                          const at::Tensor& w2, const at::Tensor& topk_weights,
                          const at::Tensor& topk_ids) {
  constexpr const char* op = "fused_moe";
  FASTGEN_CHECK_DIM(op, x, 2);
  FASTGEN_CHECK_DIM(op, w13, 3);
  FASTGEN_CHECK_DIM(op, w2, 3);
  FASTGEN_CHECK_DIM(op, topk_weights, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, x);
  FASTGEN_CHECK_CONTIGUOUS(op, w13);
  FASTGEN_CHECK_CONTIGUOUS(op, w2);
  FASTGEN_CHECK_CONTIGUOUS(op, out);
  FASTGEN_CHECK_CONTIGUOUS(op, topk_weights);
  FASTGEN_CHECK_CONTIGUOUS(op, topk_ids);
  FASTGEN_CHECK_SAME_DTYPE(op, w13, x);
  FASTGEN_CHECK_SAME_DTYPE(op, w2, x);
  FASTGEN_CHECK_SAME_DTYPE(op, out, x);
  FASTGEN_CHECK_DTYPE(op, topk_weights, at::kFloat);
  FASTGEN_CHECK_DTYPE(op, topk_ids, at::kInt);
  for (const at::Tensor* t : {&out, &w13, &w2, &topk_weights, &topk_ids}) {
    TORCH_CHECK(t->device() == x.device(), op, ": every tensor must be on ", x.device(),
                " (the device of x), got one on ", t->device());
  }
  const int64_t num_tokens = x.size(0), hidden = x.size(1), num_experts = w13.size(0);
  TORCH_CHECK(w13.size(1) % 2 == 0 && w13.size(2) == hidden, op, ": w13 must be [E, 2I, ",
              hidden, "] (gate rows, then up rows), got ", w13.sizes());
  const int64_t inter = w13.size(1) / 2;
  TORCH_CHECK(w2.size(0) == num_experts && w2.size(1) == hidden && w2.size(2) == inter, op,
              ": w2 must be [", num_experts, ", ", hidden, ", ", inter, "] (w13 is ", w13.sizes(),
              "), got ", w2.sizes());
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out shape ", out.sizes(), " != x shape ", x.sizes());
  TORCH_CHECK(topk_weights.size(0) == num_tokens && topk_weights.size(1) >= 1, op,
              ": topk_weights must be [", num_tokens, ", k] with k >= 1, got ", topk_weights.sizes());
  TORCH_CHECK(topk_ids.sizes() == topk_weights.sizes(), op, ": topk_ids shape ", topk_ids.sizes(),
              " != topk_weights shape ", topk_weights.sizes());
  TORCH_CHECK(topk_ids.numel() <= INT32_MAX, op, ": ", topk_ids.numel(),
              " (token, slot) pairs do not fit int32 ids");
}

void check_slot_values(const char* op, const at::Tensor& slot_mapping, int64_t num_slots) {
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.size(0); ++t) {
    TORCH_CHECK(slots[t] < num_slots, op, ": slot_mapping[", t, "] = ", slots[t],
                " is outside the cache's slots [0, ", num_slots, ") (negative slots are padding)");
  }
}

void check_position_values(const char* op, const at::Tensor& positions, int64_t max_position) {
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.size(0); ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_position, op, ": positions[", t, "] = ", pos[t],
                " is outside the cos_sin_cache range [0, ", max_position, ")");
  }
}

void check_attention_metadata_values(const at::Tensor& query, const at::Tensor& key_cache,
                                     const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                                     const at::Tensor& block_tables, int64_t max_seqlen_q,
                                     int64_t max_seqlen_k, const char* op) {
  const int64_t num_seqs = seq_lens_k.size(0), num_blocks = key_cache.size(0);
  const int64_t block_size = key_cache.size(1), max_blocks = block_tables.size(1);
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* k_lens = seq_lens_k.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && cu[num_seqs] == query.size(0), op,
              ": cu_seqlens_q must run from 0 to the number of query tokens ", query.size(0),
              ", got ", cu[0], " .. ", cu[num_seqs]);
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = cu[b + 1] - cu[b], k_len = k_lens[b];
    TORCH_CHECK(q_len >= 0, op, ": cu_seqlens_q must be non-decreasing, got ", cu[b], " then ",
                cu[b + 1], " at sequence ", b);
    TORCH_CHECK(q_len <= k_len && k_len <= max_blocks * block_size, op, ": sequence ", b,
                " has ", q_len, " queries and ", k_len, " keys; need q_len <= k_len <= ",
                max_blocks * block_size, " (block_tables width x block size)");
    TORCH_CHECK(q_len <= max_seqlen_q && k_len <= max_seqlen_k, op, ": sequence ", b, " (q_len ",
                q_len, ", k_len ", k_len, ") exceeds max_seqlen_q ", max_seqlen_q,
                " / max_seqlen_k ", max_seqlen_k);
    if (q_len == 0) continue;
    for (int64_t i = 0; i < (k_len + block_size - 1) / block_size; ++i) {
      const int32_t block = tables[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, op, ": block_tables[", b, ", ", i, "] = ",
                  block, " is not a cache block (the cache has ", num_blocks, ")");
    }
  }
}

}  // namespace fastgen
