// Mixture-of-experts' torch-free CPU launchers: raw pointers and sizes in, no at::Tensor. The
// adapters in moe.cpp call these (and bench/ may). Semantics (the contract) are in the moe_route,
// moe_align and fused_moe schemas in csrc/torch_bindings.cpp. T is float, c10::Half or
// c10::BFloat16; math is done in float32. Shape letters: T tokens, H hidden size, I expert
// intermediate size, E experts, k experts per token, P = T * k (token, slot) pairs, numbered
// p = t * k + j.
#pragma once

#include <cstdint>

#include "core/moe.h"

namespace fastgen::cpu {

// The router: topk_ids[t] = the k experts of the largest selection keys, topk_weights[t] their
// scores (see moe_route's schema).
void moe_route_launch(float* topk_weights,           // [num_tokens, k]
                      int32_t* topk_ids,             // [num_tokens, k]
                      const float* router_logits,    // [num_tokens, E], rows logits_stride apart
                      const float* correction_bias,  // [E], or nullptr
                      int64_t num_tokens, int64_t logits_stride, const MoeRouting& routing);

// The pairs sorted by expert (stable: by pair index within an expert), each expert's run padded
// to a multiple of block_size with the value num_pairs; expert e's run is
// sorted_ids[expert_offsets[e] : expert_offsets[e + 1]], expert_offsets[E] is the padded total;
// tile_experts[i] is the expert of sorted_ids[i * block_size : (i + 1) * block_size], -1 past the
// last tile. Entries of sorted_ids past expert_offsets[E] are num_pairs too.
void moe_align_launch(int32_t* sorted_ids,      // [moe_max_padded_pairs(num_pairs, E, block_size)]
                      int32_t* expert_offsets,  // [E + 1]
                      int32_t* tile_experts,    // [moe_max_tiles(num_pairs, E, block_size)]
                      const int32_t* topk_ids,  // [num_pairs], each in [0, E) or -1 (skipped)
                      int64_t num_pairs, int64_t num_experts, int64_t block_size);

// fused_moe's decode-size path: streams each active expert's weights once (see moe.cpp).
// sorted_ids and expert_offsets come from moe_align_launch with block_size 1.
template <typename T>
void fused_moe_stream_launch(T* out,                      // [num_tokens, H]
                             const T* x,                  // [num_tokens, H]
                             const T* w13,                // [E, 2I, H]: gate rows, then up rows
                             const T* w2,                 // [E, H, I]
                             const float* topk_weights,   // [num_tokens, k]
                             const int32_t* topk_ids,     // [num_tokens, k]: -1 skipped
                             const int32_t* sorted_ids,   // [P]
                             const int32_t* expert_offsets,  // [E + 1]
                             int64_t num_tokens, int64_t hidden, int64_t inter,
                             int64_t num_experts, int64_t top_k, bool weight_on_input);

// out[t] = sum over j = 0..k-1, in that order, of topk_weights[t, j] * expert_out[t * k + j] (in
// float32; with weight_on_input the weights were applied to the inputs and are not used here),
// leaving out the slots whose id is -1 (their expert_out rows are not read).
template <typename T>
void moe_combine_launch(T* out,                     // [num_tokens, H]
                        const float* expert_out,    // [num_tokens * k, H]
                        const float* topk_weights,  // [num_tokens, k]
                        const int32_t* topk_ids,    // [num_tokens, k]
                        int64_t num_tokens, int64_t hidden, int64_t top_k, bool weight_on_input);

}  // namespace fastgen::cpu
