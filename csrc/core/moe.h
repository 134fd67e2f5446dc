// What the CPU and CUDA MoE launchers share, torch-free: the router's configuration (parsed from
// moe_route's arguments once, by check_moe_route_args in core/op_checks.cpp) and the sizes of
// moe_align's padded outputs (the op checks, both adapters and fastgen.ops compute them alike).
// Shape letters: T tokens, E experts, k experts per token, P = T * k (token, slot) pairs.
#pragma once

#include <cstdint>

namespace fastgen {

// How router logits become scores: softmax over the E experts, or each expert's sigmoid.
enum class MoeScoring { kSoftmax, kSigmoid };

// How a group of experts is ranked in group-limited routing: by its best selection key
// (DeepSeek-V2 group_limited_greedy) or by the sum of its two best (DeepSeek-V3 noaux_tc).
enum class MoeGroupScoring { kMax, kSumTop2 };

struct MoeRouting {
  int64_t num_experts;  // E
  int64_t top_k;        // k <= E
  MoeScoring scoring;
  bool renormalize;     // weights divided by their sum (over the k slots, in slot order)
  // The experts split into num_groups equal groups, of which the topk_groups best are kept;
  // num_groups = topk_groups = 1 is ungrouped routing (one group, always kept).
  int64_t num_groups;
  int64_t topk_groups;
  MoeGroupScoring group_scoring;
  float scale;          // every weight's last factor (DeepSeek's routed_scaling_factor)
};

// moe_align's outputs for P pairs, E experts and tiles of block_size pairs: every expert's run of
// pairs is padded to whole tiles, which adds at most block_size - 1 pairs per expert.
inline int64_t moe_max_padded_pairs(int64_t num_pairs, int64_t num_experts, int64_t block_size) {
  return num_pairs + num_experts * (block_size - 1);
}
inline int64_t moe_max_tiles(int64_t num_pairs, int64_t num_experts, int64_t block_size) {
  return (moe_max_padded_pairs(num_pairs, num_experts, block_size) + block_size - 1) / block_size;
}

}  // namespace fastgen
