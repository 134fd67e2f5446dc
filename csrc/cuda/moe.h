// Mixture-of-experts' torch-free CUDA launchers: raw device pointers, sizes and a stream in, a
// cudaError_t out. The adapters in moe.cu call these with torch's current stream (and bench/ may).
// Semantics (the contract) are in the moe_route, moe_align and fused_moe schemas in
// csrc/torch_bindings.cpp. T is float, __half or __nv_bfloat16. Shape letters: T tokens, H hidden
// size, I expert intermediate size, E experts, k experts per token, P = T * k (token, slot) pairs,
// numbered p = t * k + j.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "core/moe.h"

namespace fastgen::cuda {

// The most experts the routing and alignment kernels take (their per-expert state is in shared
// memory).
constexpr int64_t kMoeMaxExperts = 1024;
// fused_moe's GEMV path takes batches of at most this many pairs (decode); larger ones the
// tensor-core GEMM. Not tuned on a GPU yet.
constexpr int64_t kMoeGemvMaxPairs = 64;

// One warp per token: scores, the group limit and k rounds of warp argmax (ties to the lower
// index), see moe.cu. E <= kMoeMaxExperts.
cudaError_t moe_route_launch(float* topk_weights,           // [num_tokens, k]
                             int32_t* topk_ids,             // [num_tokens, k]
                             const float* router_logits,    // [num_tokens, E], rows logits_stride apart
                             const float* correction_bias,  // [E], or nullptr
                             int64_t num_tokens, int64_t logits_stride, const MoeRouting& routing,
                             cudaStream_t stream);

// One block: a stable counting sort of the pairs by expert, each expert's run padded to a
// multiple of block_size (see the moe_align schema). Pairs whose id is outside [0, E) are left
// out. E <= kMoeMaxExperts, num_pairs and the padded total < 2^31.
cudaError_t moe_align_launch(int32_t* sorted_ids,      // [moe_max_padded_pairs(num_pairs, E, block_size)]
                             int32_t* expert_offsets,  // [E + 1]
                             int32_t* tile_experts,    // [moe_max_tiles(num_pairs, E, block_size)]
                             const int32_t* topk_ids,  // [num_pairs]
                             int64_t num_pairs, int64_t num_experts, int64_t block_size,
                             cudaStream_t stream);

// Bytes of device workspace fused_moe_launch needs (its alignment's outputs and the [P, I]
// activations and [P, H] expert outputs, in T of elem_size bytes).
size_t fused_moe_workspace_bytes(int64_t num_tokens, int64_t hidden, int64_t inter,
                                 int64_t num_experts, int64_t top_k, size_t elem_size);

// The whole expert MLP: align, the gate/up projection with SiLU-and-mul in its epilogue, the down
// projection, the weighted sum over the k slots. At most kMoeGemvMaxPairs pairs (decode) run through a
// bandwidth-bound grouped GEMV; more, with T = __half / __nv_bfloat16, H and I multiples of 8 and
// 16-byte-aligned x and weights, through a tensor-core grouped GEMM (mma.sync, sm_80+) over the
// sorted, padded pairs; fp32 always takes the GEMV. E <= kMoeMaxExperts; pairs with an id outside
// [0, E) contribute nothing.
template <typename T>
cudaError_t fused_moe_launch(T* out,                     // [num_tokens, H]
                             const T* x,                 // [num_tokens, H]
                             const T* w13,               // [E, 2I, H]: gate rows, then up rows
                             const T* w2,                // [E, H, I]
                             const float* topk_weights,  // [num_tokens, k]
                             const int32_t* topk_ids,    // [num_tokens, k]
                             void* workspace,            // fused_moe_workspace_bytes(...), 16-byte aligned
                             int64_t num_tokens, int64_t hidden, int64_t inter,
                             int64_t num_experts, int64_t top_k, bool weight_on_input,
                             cudaStream_t stream);

}  // namespace fastgen::cuda
