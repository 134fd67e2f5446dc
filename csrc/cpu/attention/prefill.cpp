// Prefill attention on the CPU (sequences with several queries), any dtype: keys and values
// converted to float32, float32 FMAs, flash-attention's online softmax over tiles of kKeyTile keys
// (never a [q_len, k_len] score matrix).
//
// A work item is (sequence, KV head, block of consecutive queries). Its rows are every (query,
// query head of the KV head's group) pair, so GQA heads sharing a KV head, and all queries of the
// block, reuse each key / value row. Rows are the vector lanes: queries are stored transposed
// ([D, rows]) so a score tile is rows-wide multiply-adds broadcasting one key element at a time,
// and the softmax max / sum are lane-wise too; no loop needs a horizontal reduction. Any head
// size works; multiples of kLanes take the vector paths throughout.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/attention/problem.h"
#include "cpu/attention/tile.h"
#include "cpu/vec.h"

namespace fastgen::cpu::attention_kernels {

namespace {

// One worker's buffers, sized for the largest item and reused across its items.
struct Scratch {
  explicit Scratch(int64_t max_rows, int64_t head_dim, int64_t value_dim)
      : queries_t(head_dim * max_rows), scores(kKeyTile * max_rows), keys(kKeyTile * head_dim),
        values(kKeyTile * value_dim), acc(max_rows * value_dim), row_max(max_rows),
        row_sum(max_rows), alpha(max_rows), first_key(max_rows), last_key(max_rows) {}
  std::vector<float> queries_t;  // [head_dim, rows]: queries * scale * log2(e), transposed
  std::vector<float> scores;     // [kKeyTile, rows]: log2-domain scores, then probabilities
  std::vector<float> keys;       // [kKeyTile, head_dim]
  std::vector<float> values;     // [kKeyTile, value_dim]
  std::vector<float> acc;        // [rows, value_dim]: unnormalised output
  std::vector<float> row_max, row_sum, alpha;  // [rows]
  std::vector<int32_t> first_key, last_key;    // [rows]: visible keys, inclusive
};

// scores[j, r] = sum_d queries_t[d, r] * keys[j, d] for kKeys keys at once: independent FMA
// chains (one FMA's latency would otherwise bound the loop), each queries_t load used kKeys times.
template <int64_t kKeys>
inline void score_keys(float* __restrict__ scores, const float* __restrict__ queries_t,
                       const float* __restrict__ keys, int64_t rows, int64_t head_dim) {
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
    vec::Vec sum[kKeys];
    for (int64_t i = 0; i < kKeys; ++i) sum[i] = vec::zero();
    for (int64_t d = 0; d < head_dim; ++d) {
      const vec::Vec q = vec::load(queries_t + d * rows + r0);
      for (int64_t i = 0; i < kKeys; ++i) sum[i] = vec::mul_add(q, vec::set1(keys[i * head_dim + d]), sum[i]);
    }
    for (int64_t i = 0; i < kKeys; ++i) vec::store(scores + i * rows + r0, sum[i]);
  }
}

// scores[j, r] for every key of the tile and all `rows` (a multiple of kLanes).
inline void score_tile(float* scores, const float* queries_t, const float* keys,
                       int64_t num_keys, int64_t rows, int64_t head_dim) {
  constexpr int64_t kKeys = 8;
  int64_t j = 0;
  for (; j + kKeys <= num_keys; j += kKeys) {
    score_keys<kKeys>(scores + j * rows, queries_t, keys + j * head_dim, rows, head_dim);
  }
  for (; j < num_keys; ++j) score_keys<1>(scores + j * rows, queries_t, keys + j * head_dim, rows, head_dim);
}

// acc[d] = acc[d] * alpha + sum_j weights[j * weight_stride] * values[j, d]. Up to kChunks
// register-wide slices of the row at once: independent FMA chains sharing each weight.
template <int64_t kChunks>
inline void add_weighted_slices(float* __restrict__ acc, float alpha,
                                const float* __restrict__ weights, int64_t weight_stride,
                                const float* __restrict__ values, int64_t num_keys,
                                int64_t head_dim) {
  vec::Vec sum[kChunks];
  for (int64_t c = 0; c < kChunks; ++c) sum[c] = vec::load(acc + c * kLanes) * vec::set1(alpha);
  for (int64_t j = 0; j < num_keys; ++j) {
    const vec::Vec w = vec::set1(weights[j * weight_stride]);
    for (int64_t c = 0; c < kChunks; ++c) {
      sum[c] = vec::mul_add(vec::load(values + j * head_dim + c * kLanes), w, sum[c]);
    }
  }
  for (int64_t c = 0; c < kChunks; ++c) vec::store(acc + c * kLanes, sum[c]);
}

inline void add_weighted_values(float* acc, float alpha, const float* weights,
                                int64_t weight_stride, const float* values, int64_t num_keys,
                                int64_t head_dim) {
  constexpr int64_t kChunks = 4;
  int64_t d0 = 0;
  for (; d0 + kChunks * kLanes <= head_dim; d0 += kChunks * kLanes) {
    add_weighted_slices<kChunks>(acc + d0, alpha, weights, weight_stride, values + d0, num_keys,
                                 head_dim);
  }
  for (; d0 + kLanes <= head_dim; d0 += kLanes) {
    add_weighted_slices<1>(acc + d0, alpha, weights, weight_stride, values + d0, num_keys,
                           head_dim);
  }
  for (; d0 < head_dim; ++d0) {  // head sizes that are not a multiple of kLanes
    float sum = acc[d0] * alpha;
    for (int64_t j = 0; j < num_keys; ++j) sum += weights[j * weight_stride] * values[j * head_dim + d0];
    acc[d0] = sum;
  }
}

template <typename T>
void attend_item(const Problem<T>& pb, const WorkItem& item, int64_t kv_head, Scratch& s) {
  const int64_t dim = pb.head_dim, vdim = pb.value_dim;
  const ItemRows rows = item_rows(pb, item, kv_head, s.first_key.data(), s.last_key.data());
  const int64_t padded = rows.padded;
  float* queries_t = s.queries_t.data();
  const float q_scale = pb.scale * kLog2e;
  for (int64_t r = 0; r < rows.count; ++r) {
    const T* q = pb.query_row(rows.token(r), rows.head(r));
    for (int64_t d = 0; d < dim; ++d) queries_t[d * padded + r] = static_cast<float>(q[d]) * q_scale;
  }
  for (int64_t r = rows.count; r < padded; ++r) {  // padding rows: zero queries
    for (int64_t d = 0; d < dim; ++d) queries_t[d * padded + r] = 0.f;
  }
  std::fill_n(s.row_max.begin(), padded, kNegInf);
  std::fill_n(s.row_sum.begin(), padded, 0.f);
  std::fill_n(s.acc.begin(), rows.count * vdim, 0.f);

  const int64_t keys_begin = s.first_key[0], keys_end = s.last_key[rows.count - 1] + 1;
  const int32_t* block_table = pb.block_table(item.seq);
  for (int64_t j0 = keys_begin; j0 < keys_end; j0 += kKeyTile) {
    const int64_t num_keys = std::min(kKeyTile, keys_end - j0);

    // Convert the tile's key / value rows to float32, and ask for the next tile's rows.
    for (int64_t j = 0; j < num_keys; ++j) {
      const int64_t row = pb.cache_row(pb.slot(block_table, j0 + j), kv_head);
      to_float(s.keys.data() + j * dim, pb.key_cache + row, dim);
      to_float(s.values.data() + j * vdim, pb.value_cache + row, vdim);
    }
    prefetch_head_rows(pb, block_table, j0 + kKeyTile, std::min(j0 + 2 * kKeyTile, keys_end), kv_head);

    float* scores = s.scores.data();
    score_tile(scores, queries_t, s.keys.data(), num_keys, padded, dim);

    // Mask, then the online-softmax update, lane-wise over rows.
    for (int64_t r0 = 0; r0 < padded; r0 += kLanes) {
      const vec::IVec first = vec::load(s.first_key.data() + r0), last = vec::load(s.last_key.data() + r0);
      online_softmax_update(
          s.row_max.data() + r0, s.row_sum.data() + r0, s.alpha.data() + r0, num_keys,
          [&](int64_t j) {
            float* sj = scores + j * padded + r0;
            const vec::Vec v = vec::select(sees_key(first, last, j0 + j), vec::load(sj), vec::set1(kNegInf));
            vec::store(sj, v);
            return v;
          },
          [&](vec::Vec shift, vec::Vec sum) {
            for (int64_t j = 0; j < num_keys; ++j) {
              float* sj = scores + j * padded + r0;
              const vec::Vec p = vec::exp2(vec::load(sj) - shift);
              vec::store(sj, p);
              sum = sum + p;
            }
            return sum;
          });
    }

    const int32_t* first_key = s.first_key.data();
    const int32_t* last_key = s.last_key.data();
    const float* alpha = s.alpha.data();
    for (int64_t r = 0; r < rows.count; ++r) {
      // Only the row's visible keys: the masked ones have weight 0.
      const int64_t jb = std::max<int64_t>(first_key[r], j0) - j0;
      const int64_t je = std::max(jb, std::min<int64_t>(last_key[r] + 1, j0 + num_keys) - j0);
      if (jb == je && alpha[r] == 1.f) continue;
      add_weighted_values(s.acc.data() + r * vdim, alpha[r], scores + jb * padded + r, padded,
                          s.values.data() + jb * vdim, je - jb, vdim);
    }
  }

  for (int64_t r = 0; r < rows.count; ++r) {
    // row_sum >= the weight of the query's own position, exp2(0) scaled: never 0.
    const float inv_sum = 1.f / s.row_sum[r];
    T* o = pb.out_row(rows.token(r), rows.head(r));
    const float* acc = s.acc.data() + r * vdim;
    for (int64_t d = 0; d < vdim; ++d) o[d] = static_cast<T>(acc[d] * inv_sum);
  }
}

}  // namespace

template <typename T>
void prefill(const Problem<T>& problem, const PrefillPlan& plan) {
  const int64_t kv_heads = problem.num_kv_heads;
  for_each_task(
      static_cast<int64_t>(plan.items.size()) * kv_heads,
      [&] { return Scratch(plan.max_rows, problem.head_dim, problem.value_dim); },
      [&](int64_t task, Scratch& s) { attend_item(problem, plan.items[task / kv_heads], task % kv_heads, s); });
}

template void prefill<float>(const Problem<float>&, const PrefillPlan&);
template void prefill<c10::Half>(const Problem<c10::Half>&, const PrefillPlan&);
template void prefill<c10::BFloat16>(const Problem<c10::BFloat16>&, const PrefillPlan&);

}  // namespace fastgen::cpu::attention_kernels
