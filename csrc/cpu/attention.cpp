// Paged causal attention on the CPU: the ops' adapters (attention, and MLA's mla_attention over
// the latent cache) and the torch-free launcher, which plans the batch and hands each part to a
// kernel in csrc/cpu/attention/ (see problem.h there):
//   sequences with one query   decode splits (flash-decoding), then a merge of split sequences:
//                              decode_bf16 for bf16 with head and value sizes that are multiples
//                              of 32 on AVX512-BF16 builds, decode otherwise
//   sequences with more        prefill work items (flash-attention tiles): prefill_bf16 for bf16
//                              with head and value sizes that are multiples of 16 on AVX512-BF16
//                              builds, prefill otherwise
// Every kernel keeps a float32 online softmax in the log2 domain and applies one mask rule
// (core/attention_mask.h). Any head size works.
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/attention_mask.h"
#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cpu/attention.h"
#include "cpu/attention/problem.h"
#include "cpu/vec.h"
#include "ops.h"

namespace fastgen::cpu {

template <typename T>
void attention_launch(T* out, const T* query, const T* key_cache, const T* value_cache,
                      const int32_t* cu_seqlens_q, const int32_t* seq_lens_k,
                      const int32_t* block_tables, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, int64_t value_dim, int64_t block_size,
                      int64_t max_blocks_per_seq, int64_t query_stride, float scale,
                      std::optional<int64_t> sliding_window, std::optional<int64_t> chunk_size) {
  namespace ak = attention_kernels;
  constexpr bool kBf16Pairs = vec::kHasBf16Pairs && std::is_same_v<T, c10::BFloat16>;
  const ak::Problem<T> problem{{cu_seqlens_q, seq_lens_k, block_tables, num_seqs, num_heads,
                                num_kv_heads, head_dim, block_size, max_blocks_per_seq, value_dim,
                                sliding_window.value_or(kUnbounded), chunk_size.value_or(kUnbounded)},
                               out, query, key_cache, value_cache, query_stride, scale};

  const ak::DecodePlan decode = ak::plan_decode(problem);
  std::vector<float> partials(ak::SplitStates::floats(decode.num_partials, num_heads, value_dim));
  const ak::SplitStates states{partials.data(), num_heads, value_dim};
  bool decoded = false;
  if constexpr (kBf16Pairs) {
    if (ak::decode_bf16_takes(problem)) {
      ak::decode_bf16(problem, decode, states);
      decoded = true;
    }
  }
  if (!decoded) ak::decode(problem, decode, states);
  ak::merge_decode_splits(problem, decode, states);

  const ak::PrefillPlan prefill = ak::plan_prefill(problem);
  if constexpr (kBf16Pairs) {
    if (ak::prefill_bf16_takes(problem)) return ak::prefill_bf16(problem, prefill);
  }
  ak::prefill(problem, prefill);
}

#define FASTGEN_INSTANTIATE(T)                                                                  \
  template void attention_launch<T>(T*, const T*, const T*, const T*, const int32_t*,           \
                                    const int32_t*, const int32_t*, int64_t, int64_t, int64_t,  \
                                    int64_t, int64_t, int64_t, int64_t, int64_t, float,         \
                                    std::optional<int64_t>, std::optional<int64_t>);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(c10::Half)
FASTGEN_INSTANTIATE(c10::BFloat16)
#undef FASTGEN_INSTANTIATE

void attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
               const at::Tensor& value_cache, const at::Tensor& cu_seqlens_q,
               const at::Tensor& seq_lens_k, const at::Tensor& block_tables, int64_t max_seqlen_q,
               int64_t max_seqlen_k, double scale, std::optional<int64_t> sliding_window,
               std::optional<int64_t> chunk_size) {
  constexpr const char* op = "attention";
  check_attention_args(out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k, block_tables,
                       sliding_window, chunk_size);
  // The metadata is on the host, so its values are checked here too (the kernels trust them).
  check_attention_metadata_values(query, key_cache, cu_seqlens_q, seq_lens_k, block_tables,
                                  max_seqlen_q, max_seqlen_k);
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    attention_launch<scalar_t>(out.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(),
                               key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>(),
                               cu_seqlens_q.data_ptr<int32_t>(), seq_lens_k.data_ptr<int32_t>(),
                               block_tables.data_ptr<int32_t>(), seq_lens_k.size(0), query.size(1),
                               key_cache.size(2), query.size(2), query.size(2), key_cache.size(1),
                               block_tables.size(1), query.stride(0), static_cast<float>(scale),
                               sliding_window, chunk_size);
  });
}

void mla_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& latent_cache,
                   const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                   const at::Tensor& block_tables, int64_t max_seqlen_q, int64_t max_seqlen_k,
                   double scale) {
  constexpr const char* op = "mla_attention";
  check_mla_attention_args(out, query, latent_cache, cu_seqlens_q, seq_lens_k, block_tables);
  check_attention_metadata_values(query, latent_cache.unsqueeze(2), cu_seqlens_q, seq_lens_k,
                                  block_tables, max_seqlen_q, max_seqlen_k, op);
  // One KV head whose rows are the keys (L + R) and whose first L elements are the values.
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    const scalar_t* rows = latent_cache.data_ptr<scalar_t>();
    attention_launch<scalar_t>(out.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(), rows, rows,
                               cu_seqlens_q.data_ptr<int32_t>(), seq_lens_k.data_ptr<int32_t>(),
                               block_tables.data_ptr<int32_t>(), seq_lens_k.size(0), query.size(1),
                               1, query.size(2), out.size(2), latent_cache.size(1),
                               block_tables.size(1), query.stride(0), static_cast<float>(scale),
                               std::nullopt, std::nullopt);
  });
}

}  // namespace fastgen::cpu
