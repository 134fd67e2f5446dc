// Decode attention on the CPU (sequences with one query), any dtype, flash-decoding style; and
// the merge of a sequence's splits, shared with decode_bf16.cpp.
//
// With one query a prefill item would have group rows of kLanes lanes, and one item per KV head
// is too few to keep every worker busy (3 items for 2 workers with SmolLM2). Here a unit of work
// is a split (plan.cpp): a range of one sequence's keys, for all its heads, so a page row (every
// KV head of a token) is read contiguously and long sequences spread over all workers. Lanes run
// along head_dim: a score is a dot product, reduced across lanes once per (key, head). A split
// leaves its unnormalised state (max, sum, acc) when the sequence has several; the merge
// combines them.
// Each tile's page rows are asked for kPrefetchTiles tiles ahead (tile.h's prefetch_page_rows):
// on demand, a core streams the scattered rows at a fraction of the memory bandwidth.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/attention/problem.h"
#include "cpu/attention/tile.h"
#include "cpu/vec.h"

namespace fastgen::cpu::attention_kernels {

namespace {

constexpr float kLn2 = 0.6931471805599453f;

struct Scratch {
  explicit Scratch(int64_t num_heads, int64_t head_dim, int64_t value_dim)
      : queries(num_heads * head_dim), keys(kKeyTile * head_dim), values(kKeyTile * value_dim),
        scores(kKeyTile), acc(num_heads * value_dim), row_max(num_heads), row_sum(num_heads) {}
  std::vector<float> queries;  // [num_heads, head_dim]: queries * scale * log2(e)
  std::vector<float> keys;     // [kKeyTile, head_dim]: one KV head's key rows of the tile
  std::vector<float> values;   // [kKeyTile, value_dim]: and its value rows
  std::vector<float> scores;   // [kKeyTile]
  std::vector<float> acc;      // [num_heads, value_dim]: unnormalised output
  std::vector<float> row_max, row_sum;  // [num_heads], log2 domain
};

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  vec::Vec sum0 = vec::zero(), sum1 = vec::zero();  // two chains: half the FMA latency bound
  int64_t i = 0;
  for (; i + 2 * vec::kWidth <= n; i += 2 * vec::kWidth) {
    sum0 = vec::fmadd(vec::load(a + i), vec::load(b + i), sum0);
    sum1 = vec::fmadd(vec::load(a + i + vec::kWidth), vec::load(b + i + vec::kWidth), sum1);
  }
  for (; i + vec::kWidth <= n; i += vec::kWidth) sum0 = vec::fmadd(vec::load(a + i), vec::load(b + i), sum0);
  if (i < n) sum1 = vec::fmadd(vec::load(a + i, n - i), vec::load(b + i, n - i), sum1);
  return vec::reduce_add(sum0 + sum1);
}

// acc[d] = acc[d] * alpha + sum_j weights[j] values[j, d].
inline void add_weighted_rows(float* __restrict__ acc, float alpha, const float* __restrict__ weights,
                              const float* __restrict__ values, int64_t num_keys, int64_t dim) {
  const vec::Vec a = vec::set1(alpha);
  int64_t d = 0;
  for (; d + 2 * vec::kWidth <= dim; d += 2 * vec::kWidth) {
    vec::Vec sum0 = vec::load(acc + d) * a, sum1 = vec::load(acc + d + vec::kWidth) * a;
    for (int64_t j = 0; j < num_keys; ++j) {
      const vec::Vec w = vec::set1(weights[j]);
      sum0 = vec::fmadd(w, vec::load(values + j * dim + d), sum0);
      sum1 = vec::fmadd(w, vec::load(values + j * dim + d + vec::kWidth), sum1);
    }
    vec::store(acc + d, sum0);
    vec::store(acc + d + vec::kWidth, sum1);
  }
  for (; d < dim; ++d) {  // head sizes that are not a multiple of 2 * kWidth
    float sum = acc[d] * alpha;
    for (int64_t j = 0; j < num_keys; ++j) sum += weights[j] * values[j * dim + d];
    acc[d] = sum;
  }
}

template <typename T>
void attend_split(const Problem<T>& pb, const DecodeSplit& split, Scratch& s, SplitStates states) {
  const int64_t heads = pb.num_heads, kv_heads = pb.num_kv_heads, dim = pb.head_dim;
  const int64_t vdim = pb.value_dim, group = pb.group(), token = pb.cu_seqlens_q[split.seq];
  for (int64_t h = 0; h < heads; ++h) {
    to_float(s.queries.data() + h * dim, pb.query_row(token, h), dim);
    for (int64_t d = 0; d < dim; ++d) s.queries[h * dim + d] *= pb.scale * kLog2e;
  }
  std::fill_n(s.row_max.begin(), heads, kNegInf);
  std::fill_n(s.row_sum.begin(), heads, 0.f);
  std::fill_n(s.acc.begin(), heads * vdim, 0.f);

  const int32_t* block_table = pb.block_table(split.seq);
  int64_t slots[kKeyTile];
  for (int64_t j0 = split.k_begin; j0 < split.k_end; j0 += kKeyTile) {
    const int64_t num_keys = std::min(kKeyTile, split.k_end - j0);
    const int64_t ahead = j0 + kPrefetchTiles * kKeyTile;
    prefetch_page_rows(pb, block_table, ahead, std::min(ahead + kKeyTile, split.k_end));
    for (int64_t j = 0; j < num_keys; ++j) slots[j] = pb.slot(block_table, j0 + j);
    for (int64_t kv_head = 0; kv_head < kv_heads; ++kv_head) {
      for (int64_t j = 0; j < num_keys; ++j) {
        const int64_t row = pb.cache_row(slots[j], kv_head);
        to_float(s.keys.data() + j * dim, pb.key_cache + row, dim);
        to_float(s.values.data() + j * vdim, pb.value_cache + row, vdim);
      }
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        const float* q = s.queries.data() + h * dim;
        float* scores = s.scores.data();
        float tile_max = kNegInf;
        for (int64_t j = 0; j < num_keys; ++j) {
          scores[j] = dot(q, s.keys.data() + j * dim, dim);
          tile_max = std::max(tile_max, scores[j]);
        }
        const float new_max = std::max(s.row_max[h], tile_max);  // finite: the tile has a key
        const float alpha = std::exp2(s.row_max[h] - new_max);
        vec::Vec sum = vec::zero();
        int64_t j = 0;
        for (; j + vec::kWidth <= num_keys; j += vec::kWidth) {
          const vec::Vec p = vec::exp((vec::load(scores + j) - vec::set1(new_max)) * vec::set1(kLn2));
          vec::store(scores + j, p);
          sum = sum + p;
        }
        float tail_sum = 0.f;
        for (; j < num_keys; ++j) tail_sum += scores[j] = std::exp2(scores[j] - new_max);
        s.row_sum[h] = s.row_sum[h] * alpha + vec::reduce_add(sum) + tail_sum;
        s.row_max[h] = new_max;
        add_weighted_rows(s.acc.data() + h * vdim, alpha, scores, s.values.data(), num_keys, vdim);
      }
    }
  }

  finish_decode_split(pb, split, s.acc.data(), s.row_max.data(), s.row_sum.data(), states);
}

// out for one sequence from its splits' states: each split's sum and acc scaled by
// 2^(its max - the overall max), added, then divided.
template <typename T>
void merge_sequence(const Problem<T>& pb, const DecodePlan::Merge& m, SplitStates states) {
  const int64_t dim = pb.value_dim;
  const int64_t token = pb.cu_seqlens_q[m.seq];
  std::vector<float> acc(dim);
  for (int64_t h = 0; h < pb.num_heads; ++h) {
    float max = kNegInf;
    for (int64_t i = 0; i < m.num_splits; ++i) max = std::max(max, states.at(m.first_partial + i, h).max());
    std::fill(acc.begin(), acc.end(), 0.f);
    float sum = 0.f;
    for (int64_t i = 0; i < m.num_splits; ++i) {
      const SplitState state = states.at(m.first_partial + i, h);
      const float weight = std::exp2(state.max() - max);
      sum += weight * state.sum();
      for (int64_t d = 0; d < dim; ++d) acc[d] += weight * state.acc()[d];
    }
    T* o = pb.out_row(token, h);
    for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[d] / sum);
  }
}

}  // namespace

template <typename T>
void decode(const Problem<T>& problem, const DecodePlan& plan, SplitStates states) {
  for_each_task(
      static_cast<int64_t>(plan.splits.size()), [&] { return Scratch(problem.num_heads, problem.head_dim, problem.value_dim); },
      [&](int64_t task, Scratch& s) { attend_split(problem, plan.splits[task], s, states); },
      [&](int64_t task) { prefetch_split_start(problem, plan.splits[task]); });
}

template <typename T>
void merge_decode_splits(const Problem<T>& problem, const DecodePlan& plan, SplitStates states) {
  for_each_task(
      static_cast<int64_t>(plan.merges.size()), [] { return 0; },
      [&](int64_t task, int) { merge_sequence(problem, plan.merges[task], states); });
}

#define FASTGEN_INSTANTIATE(T)                                                        \
  template void decode<T>(const Problem<T>&, const DecodePlan&, SplitStates);        \
  template void merge_decode_splits<T>(const Problem<T>&, const DecodePlan&, SplitStates);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(c10::Half)
FASTGEN_INSTANTIATE(c10::BFloat16)
#undef FASTGEN_INSTANTIATE

}  // namespace fastgen::cpu::attention_kernels
