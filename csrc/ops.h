// The tensor adapters behind every op: one declaration per op and backend. The schemas (the
// contract, with shapes) are in torch_bindings.cpp. FASTGEN_DECLARE_OPS lists the ops every
// backend implements, with the same signature; CPU-only ops are declared after it, in the CPU
// namespace alone.
#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#define FASTGEN_DECLARE_OPS                                                                      \
  void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,             \
                double epsilon);                                                                 \
  void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,    \
                          double epsilon);                                                       \
  void silu_and_mul(at::Tensor& out, const at::Tensor& input);                                  \
  void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,        \
                        int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox);      \
  void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, \
                         at::Tensor& value_cache, const at::Tensor& slot_mapping);              \
  void rotary_embedding_and_cache(const at::Tensor& positions, at::Tensor& query,               \
                                  const at::Tensor& key, const at::Tensor& value,               \
                                  int64_t head_size, const at::Tensor& cos_sin_cache,           \
                                  bool is_neox, at::Tensor& key_cache, at::Tensor& value_cache, \
                                  const at::Tensor& slot_mapping,                               \
                                  const std::optional<at::Tensor>& q_norm_weight,               \
                                  const std::optional<at::Tensor>& k_norm_weight,               \
                                  double norm_eps);                                             \
  void mla_rotary_and_cache(const at::Tensor& positions, at::Tensor& query,                     \
                            const at::Tensor& kv_a, const at::Tensor& kv_norm_weight,           \
                            double norm_eps, int64_t head_size,                                 \
                            const at::Tensor& cos_sin_cache, bool is_neox,                      \
                            at::Tensor& latent_cache, const at::Tensor& slot_mapping);          \
  void attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,         \
                 const at::Tensor& value_cache, const at::Tensor& cu_seqlens_q,                 \
                 const at::Tensor& seq_lens_k, const at::Tensor& block_tables,                  \
                 int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,                      \
                 std::optional<int64_t> sliding_window, std::optional<int64_t> chunk_size);    \
  void mla_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& latent_cache,   \
                     const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,               \
                     const at::Tensor& block_tables, int64_t max_seqlen_q, int64_t max_seqlen_k, \
                     double scale);                                                              \
  void moe_route(at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& router_logits, \
                 std::string_view scoring, bool renormalize, std::optional<int64_t> num_groups,  \
                 std::optional<int64_t> topk_groups, std::string_view group_scoring,            \
                 const std::optional<at::Tensor>& correction_bias, double scale);               \
  void moe_align(at::Tensor& sorted_ids, at::Tensor& expert_offsets, at::Tensor& tile_experts,  \
                 const at::Tensor& topk_ids, int64_t block_size);                               \
  void fused_moe(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13,                   \
                 const at::Tensor& w2, const at::Tensor& topk_weights,                          \
                 const at::Tensor& topk_ids, bool weight_on_input);                             \
  /* Block-quantized weights (core/quant_format.h); `portable` forces the CPU kernel for      \
     processors without AVX512-VNNI (the CPU otherwise picks one at run time). */             \
  void quant_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,        \
                    int64_t qtype, int64_t n, const std::optional<at::Tensor>& bias,           \
                    bool portable);                                                            \
  void quant_dequantize(at::Tensor& out, const at::Tensor& packed, int64_t qtype,              \
                        const std::optional<at::Tensor>& rows);

namespace fastgen::cpu {
FASTGEN_DECLARE_OPS

// CPU-only: on a GPU the same job is cuBLAS's (F.linear), which already runs at the memory
// roofline, so there is no CUDA kernel; on the CPU torch's small-M bf16 GEMM is too slow.
void linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias);
// CPU-only: the routed experts' sum (fused_moe) over block-quantized experts (GGUF
// ffn_*_exps, int8); on CUDA the experts are dequantized at load and go through fused_moe.
void quant_fused_moe(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13, int64_t w13_qtype,
                     const at::Tensor& w2, int64_t w2_qtype, int64_t inter,
                     const at::Tensor& topk_weights, const at::Tensor& topk_ids, bool weight_on_input,
                     int64_t max_stream_tokens);
}  // namespace fastgen::cpu

#ifdef FASTGEN_WITH_CUDA
namespace fastgen::cuda {
FASTGEN_DECLARE_OPS
}  // namespace fastgen::cuda
#endif
