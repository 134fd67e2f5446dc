// Mixture-of-experts on the CPU: the router (moe_route), the dispatch of (token, slot) pairs to
// experts (moe_align) and the grouped SwiGLU expert MLP with the weighted sum over the k slots
// (fused_moe).
//
// fused_moe with few tokens per active expert (decode) is bound by reading the selected experts'
// weights, so it follows cpu/linear.cpp's weight-streaming design, over all experts at once:
//   - the pairs are sorted by expert (moe_align with tiles of 1: a stable counting sort) and each
//     active expert's input rows gathered (repacked for VDPBF16PS where bf16 uses it);
//   - one at::parallel_for per projection over work items (active expert, group of kRows output
//     rows), all experts' items in one list, so the projection forks once and each thread streams
//     a contiguous run of the active experts' weights, front to back; items are of equal size;
//   - gate/up: an item reads kRows gate rows and the kRows up rows of the same outputs (two
//     streams) through cpu/dot_tile.h's register tile, for every input row of its expert, then
//     applies SiLU-and-mul to the fp32 sums (scaled first by the router weight when
//     weight_on_input: w13 is linear, so that is expert(w * x)'s first layer) and rounds the
//     activation to T, in sorted order, so that the down projection reads each expert's rows
//     contiguously;
//   - down: the same over w2's rows, writing each pair's fp32 result at its pair index;
//   - combine: out[t] = sum_j w_j * y[t, j] over the k slots in slot order, in fp32, rounded once.
// No atomics anywhere, and every dot product's arithmetic depends only on its own two rows
// (cpu/dot_tile.h), so a token's output is bitwise the same alone or in any batch that takes this
// path. Unselected experts' weights are never touched.
//
// With many tokens per active expert (prefill) the GEMMs are compute-bound: each active
// expert's gathered tokens go through at::linear (oneDNN / MKL, AMX where present) and the same
// combine. The switch is stream_max_tokens_per_expert (see there for how it was measured).
//
// quant_fused_moe is the same sum over block-quantized experts (GGUF ffn_*_exps, int8): each
// active expert's gathered rows go through cpu/quant.h's kernel (up to max_stream_tokens rows)
// or its weight dequantized and at::linear (more), expert by expert, then the same combine.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cpu/activation.h"
#include "cpu/dot_tile.h"
#include "cpu/moe.h"
#include "cpu/quant.h"
#include "cpu/vec.h"
#include "ops.h"

// GCC 12's AVX-512 reductions read an _mm*_undefined_* operand, which -Wuninitialized reports
// wherever they are inlined (GCC bug 105593, as in cpu/vec.h); the code here is clean.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace fastgen::cpu {

namespace {

using gemv::kMaxInputs;
using gemv::kRows;

// Most tokens per active expert (on average) for which fused_moe streams the weights itself
// rather than calling at::linear per expert. Measured with one expert given n tokens, Qwen3-MoE
// (H 2048, I 768) and Mixtral (H 1024, I 14336) shaped, best of 5, on a 2-core AMD EPYC with
// AVX2 (no bf16 dot product):
//   - float32: MKL's sgemm wins from 64-96 tokens on (streamed vs at::linear, Qwen3 shape: 6.4
//     vs 6.9 ms at 48 tokens, 7.2 vs 8.0 at 64, 10.9 vs 10.4 at 96; Mixtral shape: 67 vs 77 ms at
//     48, 148 vs 83 at 64): 48;
//   - bf16 / fp16 without AVX512-BF16: torch's GEMM converts to float32 and reaches ~17 GFLOP/s,
//     the streaming kernel 70-90 at every size measured (1-192 tokens: 4-10x faster), so it
//     takes every batch;
//   - with AVX512-BF16 (oneDNN's bf16 GEMMs use it, and AMX where present): 32, the crossover
//     linear's CPU_LINEAR_MAX_TOKENS measured on an AVX512-BF16 EPYC (not re-measured for MoE).
template <typename T>
constexpr int64_t stream_max_tokens_per_expert() {
  if constexpr (std::is_same_v<T, float>) return 48;
#if defined(FASTGEN_CPU_DPBF16)
  return 32;
#else
  return std::numeric_limits<int64_t>::max();
#endif
}

// Below this many elements per task, routing and the combine stay on one thread.
constexpr int64_t kMinElementsPerTask = 16384;

// One active expert's run of pairs: sorted positions [begin, begin + count).
struct Segment {
  int64_t expert;
  int64_t begin;
  int64_t count;
};

std::vector<Segment> active_segments(const int32_t* expert_offsets, int64_t num_experts) {
  std::vector<Segment> segments;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t count = expert_offsets[e + 1] - expert_offsets[e];
    if (count > 0) segments.push_back({e, expert_offsets[e], count});
  }
  return segments;
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// ---- routing ------------------------------------------------------------------------------------

// One token's routing (moe_route's schema), with scratch arrays of E (scores, keys, eligible) and
// num_groups (group_keys, group_kept) entries.
void route_token(float* weights,  // [k]
                 int32_t* ids,    // [k]
                 const float* logits,  // [E]
                 const float* bias,    // [E], or nullptr
                 const MoeRouting& routing, float* scores, float* keys, uint8_t* eligible,
                 float* group_keys, uint8_t* group_kept) {
  using namespace vec;
  const int64_t num_experts = routing.num_experts;
  // Scores, in float32: softmax (max subtracted) or sigmoid, the exps lane-wise.
  if (routing.scoring == MoeScoring::kSoftmax) {
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < num_experts; ++i) max = std::max(max, logits[i]);
    const Vec shift = set1(std::isinf(max) ? 0.f : max);
    int64_t i = 0;
    for (; i + kWidth <= num_experts; i += kWidth)
      vec::store(scores + i, vec::exp(vec::load(logits + i) - shift));
    if (i < num_experts) {
      const int64_t n = num_experts - i;
      vec::store(scores + i, vec::exp(vec::load(logits + i, n) - shift), n);
    }
    float sum = 0.f;
    for (int64_t e = 0; e < num_experts; ++e) sum += scores[e];
    for (int64_t e = 0; e < num_experts; ++e) scores[e] /= sum;
  } else {
    const Vec one = set1(1.f);
    int64_t i = 0;
    for (; i + kWidth <= num_experts; i += kWidth)
      vec::store(scores + i, one / (one + vec::exp(zero() - vec::load(logits + i))));
    if (i < num_experts) {
      const int64_t n = num_experts - i;
      vec::store(scores + i, one / (one + vec::exp(zero() - vec::load(logits + i, n))), n);
    }
  }
  // Selection keys (the bias only selects; NaN ranks as -inf).
  for (int64_t e = 0; e < num_experts; ++e) {
    const float key = bias ? scores[e] + bias[e] : scores[e];
    keys[e] = std::isnan(key) ? -std::numeric_limits<float>::infinity() : key;
  }
  // The eligible experts: those of the topk_groups best groups (all, ungrouped).
  if (routing.num_groups > 1) {
    const int64_t group_size = num_experts / routing.num_groups;
    for (int64_t g = 0; g < routing.num_groups; ++g) {
      const float* k = keys + g * group_size;
      float best = -std::numeric_limits<float>::infinity(), second = best;
      for (int64_t i = 0; i < group_size; ++i) {
        if (k[i] > best) {
          second = best;
          best = k[i];
        } else if (k[i] > second) {
          second = k[i];
        }
      }
      group_keys[g] = routing.group_scoring == MoeGroupScoring::kMax ? best : best + second;
      group_kept[g] = 0;
    }
    std::fill(eligible, eligible + num_experts, uint8_t{0});
    for (int64_t round = 0; round < routing.topk_groups; ++round) {
      int64_t best = -1;  // the first of the largest: ties go to the lower group
      for (int64_t g = 0; g < routing.num_groups; ++g)
        if (!group_kept[g] && (best < 0 || group_keys[g] > group_keys[best])) best = g;
      group_kept[best] = 1;
      std::fill(eligible + best * group_size, eligible + (best + 1) * group_size, uint8_t{1});
    }
  } else {
    std::fill(eligible, eligible + num_experts, uint8_t{1});
  }
  // k rounds of argmax over the eligible experts: descending keys, ties to the lower index.
  for (int64_t j = 0; j < routing.top_k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < num_experts; ++e)
      if (eligible[e] && (best < 0 || keys[e] > keys[best])) best = e;
    eligible[best] = 0;
    ids[j] = static_cast<int32_t>(best);
    weights[j] = scores[best];
  }
  float sum = 0.f;
  for (int64_t j = 0; j < routing.top_k; ++j) sum += weights[j];
  for (int64_t j = 0; j < routing.top_k; ++j)
    weights[j] = (routing.renormalize ? weights[j] / sum : weights[j]) * routing.scale;
}

// ---- the streaming expert MLP ---------------------------------------------------------------------

// The input rows of one projection for every segment, in the layout cpu/dot_tile.h reads: sorted
// position s at s * row_elems elements, each segment packed on its own (pack_rows).
template <typename T>
struct SortedInputs {
  std::vector<T> data;
  int64_t row_elems;
  const T* segment(const Segment& seg) const { return data.data() + seg.begin * row_elems; }
};

// The P = num_rows sorted input rows of k elements, row(s) giving sorted position s's.
template <typename T, typename RowFn>
SortedInputs<T> sort_inputs(const std::vector<Segment>& segments, int64_t num_rows, int64_t k,
                            RowFn row) {
  SortedInputs<T> inputs{std::vector<T>(num_rows * gemv::packed_row_elems<T>(k)),
                         gemv::packed_row_elems<T>(k)};
  for (const Segment& seg : segments) {
    gemv::pack_rows<kMaxInputs>(inputs.data.data() + seg.begin * inputs.row_elems, seg.count, k,
                                [&](int64_t i) { return row(seg.begin + i); });
  }
  return inputs;
}

// Runs item(segment, first output row, rows) for every work item: (segment, group of kRows rows of
// an n-row projection), all segments' items in one parallel_for, split by weight bytes.
template <typename ItemFn>
void for_each_item(const std::vector<Segment>& segments, int64_t n, int64_t bytes_per_group,
                   ItemFn item) {
  const int64_t groups = (n + kRows - 1) / kRows;
  const int64_t items = static_cast<int64_t>(segments.size()) * groups;
  const int64_t grain =
      std::max<int64_t>(1, gemv::kMinBytesPerTask / std::max<int64_t>(bytes_per_group, 1));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i % groups * kRows;
      item(segments[i / groups], row, std::min<int64_t>(kRows, n - row));
    }
  });
}

// act[s, row : row + R] = silu(a_s * gate) * (a_s * up) for the segment's sorted positions s, with
// gate / up the fp32 sums of w13's rows row.. and inter + row.., a_s the pair's router weight when
// weight_on_input (1 otherwise).
template <int R, typename T>
void gate_up_tile(T* act,                // [P, I], in sorted order
                  const T* inputs,       // the segment's x rows (SortedInputs::segment)
                  const Segment& seg,
                  const T* w13_e,        // [2I, H]: the segment's expert
                  const float* scales,   // [P] by sorted position, or nullptr
                  int64_t row, int64_t hidden, int64_t inter) {
  constexpr int MB = kMaxInputs;
  const T* gate_w = w13_e + row * hidden;
  const T* up_w = w13_e + (inter + row) * hidden;
  const char* gate_ahead = reinterpret_cast<const char*>(gate_w + R * hidden) + gemv::kPrefetchExtra;
  const char* up_ahead = reinterpret_cast<const char*>(up_w + R * hidden) + gemv::kPrefetchExtra;
  const int64_t passes = (seg.count + MB - 1) / MB;
  float gate[MB][R], up[MB][R];
  for (int64_t i0 = 0; i0 < seg.count; i0 += MB) {
    const int64_t count = std::min<int64_t>(seg.count - i0, MB);
    gemv::dot_rows<R, MB>(inputs, hidden, i0, count, hidden, gate_w, gate_ahead, passes, gate);
    gemv::dot_rows<R, MB>(inputs, hidden, i0, count, hidden, up_w, up_ahead, passes, up);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t s = seg.begin + i0 + i;
      const float a = scales ? scales[s] : 1.f;
      FASTGEN_UNROLL
      for (int r = 0; r < R; ++r)
        act[s * inter + row + r] = static_cast<T>(silu(a * gate[i][r]) * (a * up[i][r]));
    }
  }
}

// y[sorted_ids[s], row : row + R] = the fp32 sums of w2's rows row.. for the segment's positions s.
template <int R, typename T>
void down_tile(float* y,                    // [P, H], by pair index
               const T* inputs,             // the segment's activation rows
               const Segment& seg,
               const T* w2_e,               // [H, I]: the segment's expert
               const int32_t* sorted_ids,   // [P]
               int64_t row, int64_t hidden, int64_t inter) {
  constexpr int MB = kMaxInputs;
  const T* w = w2_e + row * inter;
  const char* ahead = reinterpret_cast<const char*>(w + R * inter) + gemv::kPrefetchExtra;
  const int64_t passes = (seg.count + MB - 1) / MB;
  float sums[MB][R];
  for (int64_t i0 = 0; i0 < seg.count; i0 += MB) {
    const int64_t count = std::min<int64_t>(seg.count - i0, MB);
    gemv::dot_rows<R, MB>(inputs, inter, i0, count, inter, w, ahead, passes, sums);
    for (int64_t i = 0; i < count; ++i) {
      float* y_row = y + static_cast<int64_t>(sorted_ids[seg.begin + i0 + i]) * hidden + row;
      FASTGEN_UNROLL
      for (int r = 0; r < R; ++r) y_row[r] = sums[i][r];
    }
  }
}

}  // namespace

// ---- launchers ------------------------------------------------------------------------------------

void moe_route_launch(float* topk_weights, int32_t* topk_ids, const float* router_logits,
                      const float* correction_bias, int64_t num_tokens, int64_t logits_stride,
                      const MoeRouting& routing) {
  const int64_t num_experts = routing.num_experts, k = routing.top_k;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / num_experts);
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(num_experts), keys(num_experts), group_keys(routing.num_groups);
    std::vector<uint8_t> eligible(num_experts), group_kept(routing.num_groups);
    for (int64_t t = begin; t < end; ++t) {
      route_token(topk_weights + t * k, topk_ids + t * k, router_logits + t * logits_stride,
                  correction_bias, routing, scores.data(), keys.data(), eligible.data(),
                  group_keys.data(), group_kept.data());
    }
  });
}

void moe_align_launch(int32_t* sorted_ids, int32_t* expert_offsets, int32_t* tile_experts,
                      const int32_t* topk_ids, int64_t num_pairs, int64_t num_experts,
                      int64_t block_size) {
  std::vector<int64_t> counts(num_experts, 0);
  for (int64_t p = 0; p < num_pairs; ++p)
    if (topk_ids[p] >= 0) ++counts[topk_ids[p]];  // -1: a pair with no expert here, skipped
  expert_offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t padded = (counts[e] + block_size - 1) / block_size * block_size;
    expert_offsets[e + 1] = static_cast<int32_t>(expert_offsets[e] + padded);
  }
  const int64_t padded_pairs = moe_max_padded_pairs(num_pairs, num_experts, block_size);
  std::fill(sorted_ids, sorted_ids + padded_pairs, static_cast<int32_t>(num_pairs));
  std::vector<int64_t> cursor(expert_offsets, expert_offsets + num_experts);
  for (int64_t p = 0; p < num_pairs; ++p)
    if (topk_ids[p] >= 0) sorted_ids[cursor[topk_ids[p]]++] = static_cast<int32_t>(p);
  const int64_t tiles = moe_max_tiles(num_pairs, num_experts, block_size);
  std::fill(tile_experts, tile_experts + tiles, -1);
  for (int64_t e = 0; e < num_experts; ++e)
    std::fill(tile_experts + expert_offsets[e] / block_size,
              tile_experts + expert_offsets[e + 1] / block_size, static_cast<int32_t>(e));
}

template <typename T>
void fused_moe_stream_launch(T* out, const T* x, const T* w13, const T* w2,
                             const float* topk_weights, const int32_t* topk_ids,
                             const int32_t* sorted_ids, const int32_t* expert_offsets,
                             int64_t num_tokens, int64_t hidden, int64_t inter,
                             int64_t num_experts, int64_t top_k, bool weight_on_input) {
  const int64_t num_pairs = num_tokens * top_k;
  if (num_pairs == 0) return;
  const std::vector<Segment> segments = active_segments(expert_offsets, num_experts);
  const int64_t routed = expert_offsets[num_experts];  // the pairs not skipped (block size 1)
  // The router weight of each sorted position, when it scales the expert's input.
  std::vector<float> scales;
  if (weight_on_input) {
    scales.resize(num_pairs);
    for (int64_t s = 0; s < routed; ++s) scales[s] = topk_weights[sorted_ids[s]];
  }
  const SortedInputs<T> x_sorted = sort_inputs<T>(segments, num_pairs, hidden, [&](int64_t s) {
    return x + sorted_ids[s] / top_k * hidden;
  });
  std::vector<T> act(num_pairs * inter);  // [P, I], in sorted order
  for_each_item(segments, inter, 2 * kRows * hidden * static_cast<int64_t>(sizeof(T)),
                   [&](const Segment& seg, int64_t row, int64_t rows) {
    const T* inputs = x_sorted.segment(seg);
    const T* w13_e = w13 + seg.expert * 2 * inter * hidden;
    const float* a = weight_on_input ? scales.data() : nullptr;
    if (rows == kRows) return gate_up_tile<kRows>(act.data(), inputs, seg, w13_e, a, row, hidden, inter);
    for (int64_t r = 0; r < rows; ++r)
      gate_up_tile<1>(act.data(), inputs, seg, w13_e, a, row + r, hidden, inter);
  });
  // The activations as the down projection's tile reads them (as they are, unless repacked).
  SortedInputs<T> act_packed;
  const T* act_rows = act.data();
  if constexpr (gemv::kPacked<T>) {
    act_packed = sort_inputs<T>(segments, num_pairs, inter,
                                [&](int64_t s) { return act.data() + s * inter; });
  }
  std::vector<float> y(num_pairs * hidden);  // [P, H], by pair index
  for_each_item(segments, hidden, kRows * inter * static_cast<int64_t>(sizeof(T)),
                   [&](const Segment& seg, int64_t row, int64_t rows) {
    const T* inputs = gemv::kPacked<T> ? act_packed.segment(seg) : act_rows + seg.begin * inter;
    const T* w2_e = w2 + seg.expert * hidden * inter;
    if (rows == kRows) return down_tile<kRows>(y.data(), inputs, seg, w2_e, sorted_ids, row, hidden, inter);
    for (int64_t r = 0; r < rows; ++r)
      down_tile<1>(y.data(), inputs, seg, w2_e, sorted_ids, row + r, hidden, inter);
  });
  moe_combine_launch(out, y.data(), topk_weights, topk_ids, num_tokens, hidden, top_k,
                     weight_on_input);
}

template <typename T>
void moe_combine_launch(T* out, const float* expert_out, const float* topk_weights,
                        const int32_t* topk_ids, int64_t num_tokens, int64_t hidden,
                        int64_t top_k, bool weight_on_input) {
  using namespace vec;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(hidden * top_k, 1));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* y = expert_out + t * top_k * hidden;
      T* o = out + t * hidden;
      auto sum = [&](int64_t h, int64_t n) {  // the k slots' weighted sum at h.. (n < kWidth: a tail)
        Vec acc = zero();
        for (int64_t j = 0; j < top_k; ++j) {
          if (topk_ids[t * top_k + j] < 0) continue;  // skipped: no expert here
          const Vec w = set1(weight_on_input ? 1.f : topk_weights[t * top_k + j]);
          const float* y_j = y + j * hidden + h;
          acc = fmadd(w, n == kWidth ? vec::load(y_j) : vec::load(y_j, n), acc);
        }
        return acc;
      };
      int64_t h = 0;
      for (; h + kWidth <= hidden; h += kWidth) vec::store(o + h, sum(h, kWidth));
      if (h < hidden) vec::store(o + h, sum(h, hidden - h), hidden - h);
    }
  });
}

#define FASTGEN_INSTANTIATE(T)                                                                    \
  template void fused_moe_stream_launch<T>(T*, const T*, const T*, const T*, const float*,        \
                                           const int32_t*, const int32_t*, const int32_t*,        \
                                           int64_t, int64_t, int64_t, int64_t, int64_t, bool);    \
  template void moe_combine_launch<T>(T*, const float*, const float*, const int32_t*, int64_t,   \
                                      int64_t, int64_t, bool);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(c10::Half)
FASTGEN_INSTANTIATE(c10::BFloat16)
#undef FASTGEN_INSTANTIATE

// ---- tensor adapters ------------------------------------------------------------------------------

namespace {

// Every id of topk_ids [T, k] in [0, num_experts) or -1 (skipped), or an error naming the first
// that is neither.
void check_expert_ids(const char* op, const at::Tensor& topk_ids, int64_t num_experts) {
  const int32_t* ids = topk_ids.data_ptr<int32_t>();
  const int64_t k = topk_ids.size(1);
  for (int64_t p = 0; p < topk_ids.numel(); ++p) {
    TORCH_CHECK(ids[p] >= -1 && ids[p] < num_experts, op, ": topk_ids[", p / k, ", ", p % k,
                "] = ", ids[p], " is not an expert id in [0, ", num_experts, ") or -1 (skip)");
  }
}

// The pairs of topk_ids [T, k] sorted by expert (moe_align with tiles of 1) and the active
// experts' runs of them: fused_moe's and quant_fused_moe's dispatch.
struct Dispatch {
  at::Tensor sorted_ids;               // [T * k] int32
  std::vector<int32_t> expert_offsets; // [E + 1]
  std::vector<Segment> segments;       // the active experts' runs
};

Dispatch dispatch_pairs(const at::Tensor& topk_ids, int64_t num_experts) {
  const int64_t num_pairs = topk_ids.numel();
  Dispatch d{at::empty({num_pairs}, topk_ids.options()), std::vector<int32_t>(num_experts + 1), {}};
  std::vector<int32_t> tile_experts(num_pairs);
  moe_align_launch(d.sorted_ids.data_ptr<int32_t>(), d.expert_offsets.data(), tile_experts.data(),
                   topk_ids.data_ptr<int32_t>(), num_pairs, num_experts, 1);
  d.segments = active_segments(d.expert_offsets.data(), num_experts);
  return d;
}

// Every active expert's gathered rows (scaled by the router weight first when weight_on_input)
// through mlp(seg, xs) -> its output [c, H] float32, kept by pair index, then the combine: the
// expert-at-a-time path of fused_moe (prefill) and quant_fused_moe.
template <typename T, typename MlpFn>
void experts_one_by_one(at::Tensor& out, const at::Tensor& x, const at::Tensor& topk_weights,
                        const at::Tensor& topk_ids, const at::Tensor& sorted_ids,
                        const std::vector<Segment>& segments, bool weight_on_input, MlpFn mlp) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  const int64_t top_k = topk_weights.size(1), num_pairs = num_tokens * top_k;
  at::Tensor y = at::empty({num_pairs, hidden}, x.options().dtype(at::kFloat));
  const at::Tensor pair_weights = topk_weights.view({num_pairs});
  for (const Segment& seg : segments) {
    const at::Tensor pairs = sorted_ids.narrow(0, seg.begin, seg.count).to(at::kLong);  // [c]
    at::Tensor xs = x.index_select(0, pairs.div(top_k, "floor"));                       // [c, H]
    if (weight_on_input) {
      const at::Tensor scales = pair_weights.index_select(0, pairs).unsqueeze(1);  // [c, 1]
      xs = xs.to(at::kFloat).mul(scales).to(x.scalar_type());
    }
    y.index_copy_(0, pairs, mlp(seg, xs));  // [c, H]
  }
  moe_combine_launch<T>(out.data_ptr<T>(), y.data_ptr<float>(), topk_weights.data_ptr<float>(),
                        topk_ids.data_ptr<int32_t>(), num_tokens, hidden, top_k, weight_on_input);
}

// The prefill path: every active expert's gathered tokens through at::linear (oneDNN / MKL).
template <typename T>
void fused_moe_gemm(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13,
                    const at::Tensor& w2, const at::Tensor& topk_weights,
                    const at::Tensor& topk_ids, const at::Tensor& sorted_ids,
                    const std::vector<Segment>& segments, bool weight_on_input) {
  const int64_t inter = w2.size(2);
  experts_one_by_one<T>(out, x, topk_weights, topk_ids, sorted_ids, segments, weight_on_input,
                        [&](const Segment& seg, const at::Tensor& xs) {
    const at::Tensor gate_up = at::linear(xs, w13[seg.expert]);  // [c, 2I]
    at::Tensor act = at::empty({seg.count, inter}, x.options());
    silu_and_mul_launch<T>(act.data_ptr<T>(), gate_up.data_ptr<T>(), seg.count, inter, gate_up.stride(0));
    return at::linear(act, w2[seg.expert]).to(at::kFloat);
  });
}

}  // namespace

void moe_route(at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& router_logits,
               std::string_view scoring, bool renormalize, std::optional<int64_t> num_groups,
               std::optional<int64_t> topk_groups, std::string_view group_scoring,
               const std::optional<at::Tensor>& correction_bias, double scale) {
  const MoeRouting routing =
      check_moe_route_args(topk_weights, topk_ids, router_logits, scoring, renormalize,
                           num_groups, topk_groups, group_scoring, correction_bias, scale);
  moe_route_launch(topk_weights.data_ptr<float>(), topk_ids.data_ptr<int32_t>(),
                   router_logits.data_ptr<float>(),
                   correction_bias ? correction_bias->data_ptr<float>() : nullptr,
                   router_logits.size(0), router_logits.stride(0), routing);
}

void moe_align(at::Tensor& sorted_ids, at::Tensor& expert_offsets, at::Tensor& tile_experts,
               const at::Tensor& topk_ids, int64_t block_size) {
  constexpr const char* op = "moe_align";
  check_moe_align_args(sorted_ids, expert_offsets, tile_experts, topk_ids, block_size);
  const int64_t num_experts = expert_offsets.size(0) - 1;
  check_expert_ids(op, topk_ids, num_experts);
  moe_align_launch(sorted_ids.data_ptr<int32_t>(), expert_offsets.data_ptr<int32_t>(),
                   tile_experts.data_ptr<int32_t>(), topk_ids.data_ptr<int32_t>(),
                   topk_ids.numel(), num_experts, block_size);
}

void fused_moe(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
               const at::Tensor& topk_weights, const at::Tensor& topk_ids, bool weight_on_input) {
  constexpr const char* op = "fused_moe";
  check_fused_moe_args(out, x, w13, w2, topk_weights, topk_ids);
  const int64_t num_tokens = x.size(0), hidden = x.size(1), inter = w2.size(2);
  const int64_t num_experts = w13.size(0), top_k = topk_ids.size(1);
  check_expert_ids(op, topk_ids, num_experts);
  if (num_tokens == 0) return;
  const auto [sorted_ids, expert_offsets, segments] = dispatch_pairs(topk_ids, num_experts);
  const int64_t active = static_cast<int64_t>(segments.size());
  if (active == 0) {  // every pair skipped (expert parallelism: all routed to other ranks)
    out.zero_();
    return;
  }
  const int64_t routed = expert_offsets[num_experts];
  FASTGEN_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    if ((routed + active - 1) / active <= stream_max_tokens_per_expert<scalar_t>()) {
      fused_moe_stream_launch<scalar_t>(
          out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w13.data_ptr<scalar_t>(),
          w2.data_ptr<scalar_t>(), topk_weights.data_ptr<float>(), topk_ids.data_ptr<int32_t>(),
          sorted_ids.data_ptr<int32_t>(), expert_offsets.data(), num_tokens, hidden, inter,
          num_experts, top_k, weight_on_input);
    } else {
      fused_moe_gemm<scalar_t>(out, x, w13, w2, topk_weights, topk_ids, sorted_ids, segments,
                               weight_on_input);
    }
  });
}

// ---- quantized experts ------------------------------------------------------------------------

namespace {

// One packed expert stack [E, ceil(n / 16), K / SB, chunk_bytes] (core/quant_format.h's tiles of
// every expert, stacked) as the quantized kernels read it.
void check_packed_experts(const char* op, const char* name, const at::Tensor& w, int64_t qtype,
                          int64_t num_experts, int64_t n, int64_t k) {
  TORCH_CHECK(quant::is_supported(qtype), op, ": ", name, "_qtype ", qtype,
              " is not a supported GGML type (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)");
  const quant::Format f = quant::format_of(static_cast<quant::QType>(qtype));
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 4 && w.is_contiguous(),
              op, ": ", name, " must be a contiguous uint8 CPU tensor [E, tiles, blocks, chunk]");
  TORCH_CHECK(k % f.super_elems == 0, op, ": ", name, "'s input size ", k, " is not a multiple of ",
              quant::name_of(static_cast<quant::QType>(qtype)), "'s ", f.super_elems);
  const int64_t want[4] = {num_experts, (n + quant::kTileRows - 1) / quant::kTileRows, k / f.super_elems,
                           f.chunk_bytes()};
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(w.size(d) == want[d], op, ": ", name, " has shape ", w.sizes(), ", expected [", want[0],
                ", ", want[1], ", ", want[2], ", ", want[3], "] for ", num_experts, " experts of [", n,
                ", ", k, "] in ", quant::name_of(static_cast<quant::QType>(qtype)));
  }
}

// x [c, k] @ W_e^T for expert e's packed W -> [c, n] in out_dtype (x's dtype or float32):
// streamed through the quantized kernel for up to max_stream rows, else W dequantized to x's
// dtype and through at::linear (as quantized_linear's prefill path, rounded to x's dtype first).
at::Tensor expert_linear(const at::Tensor& x, const at::Tensor& stack, int64_t e, quant::QType q,
                         int64_t n, at::ScalarType out_dtype, int64_t max_stream) {
  const int64_t c = x.size(0), k = x.size(1);
  const uint8_t* packed = stack[e].data_ptr<uint8_t>();
  if (c > max_stream) {
    at::Tensor w = at::empty({n, k}, x.options());
    FASTGEN_DISPATCH_FLOAT(x.scalar_type(), "quant_fused_moe", [&] {
      quant_dequantize_launch<scalar_t>(w.data_ptr<scalar_t>(), packed, q, nullptr, n, k);
    });
    return at::linear(x, w).to(out_dtype);
  }
  at::Tensor y = at::empty({c, n}, x.options().dtype(out_dtype));
  FASTGEN_DISPATCH_FLOAT(x.scalar_type(), "quant_fused_moe", [&] {
    if (out_dtype == x.scalar_type()) {
      quant_linear_launch<scalar_t, scalar_t>(y.data_ptr<scalar_t>(), n, x.data_ptr<scalar_t>(), k,
                                              packed, q, nullptr, c, n, k, false);
    } else {
      quant_linear_launch<scalar_t, float>(y.data_ptr<float>(), n, x.data_ptr<scalar_t>(), k, packed,
                                           q, nullptr, c, n, k, false);
    }
  });
  return y;
}

}  // namespace

void quant_fused_moe(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13, int64_t w13_qtype,
                     const at::Tensor& w2, int64_t w2_qtype, int64_t inter,
                     const at::Tensor& topk_weights, const at::Tensor& topk_ids, bool weight_on_input,
                     int64_t max_stream_tokens) {
  constexpr const char* op = "quant_fused_moe";
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() && at::isFloatingType(x.scalar_type()),
              op, ": x must be a contiguous [T, H] float CPU tensor");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.is_contiguous(), op,
              ": out must be contiguous, of x's shape and dtype");
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt && topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) &&
                  topk_ids.is_contiguous(),
              op, ": topk_ids must be contiguous int32 [T, k]");
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat && topk_weights.sizes() == topk_ids.sizes() &&
                  topk_weights.is_contiguous(),
              op, ": topk_weights must be contiguous float32 of topk_ids' shape");
  TORCH_CHECK(inter > 0, op, ": inter must be positive");
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  const int64_t num_experts = w13.size(0);
  check_packed_experts(op, "w13", w13, w13_qtype, num_experts, 2 * inter, hidden);
  check_packed_experts(op, "w2", w2, w2_qtype, num_experts, hidden, inter);
  check_expert_ids(op, topk_ids, num_experts);
  if (num_tokens == 0) return;
  const auto [sorted_ids, expert_offsets, segments] = dispatch_pairs(topk_ids, num_experts);
  if (segments.empty()) {  // every pair skipped (expert parallelism: all routed to other ranks)
    out.zero_();
    return;
  }
  const auto q13 = static_cast<quant::QType>(w13_qtype), q2 = static_cast<quant::QType>(w2_qtype);
  FASTGEN_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    using T = scalar_t;
    experts_one_by_one<T>(out, x, topk_weights, topk_ids, sorted_ids, segments, weight_on_input,
                          [&](const Segment& seg, const at::Tensor& xs) {
      const at::Tensor gate_up =
          expert_linear(xs, w13, seg.expert, q13, 2 * inter, x.scalar_type(), max_stream_tokens);
      at::Tensor act = at::empty({seg.count, inter}, x.options());
      silu_and_mul_launch<T>(act.data_ptr<T>(), gate_up.data_ptr<T>(), seg.count, inter, 2 * inter);
      return expert_linear(act, w2, seg.expert, q2, hidden, at::kFloat, max_stream_tokens);
    });
  });
}

}  // namespace fastgen::cpu
