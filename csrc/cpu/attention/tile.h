// Pieces the CPU attention kernels (csrc/cpu/attention/*.cpp) share: the thread-pool loop, the
// conversion of cache rows and the prefetch of a head's rows, a prefill item's rows and the
// lane-wise online-softmax step, a decode split's end, and the bf16 value-pair packing of the
// AVX512-BF16 kernels. Each is written once so that the kernels differ only in their products.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "cpu/attention/problem.h"
#include "cpu/vec.h"

namespace fastgen::cpu::attention_kernels {

// Runs fn(task, scratch) for every task in [0, num_tasks) on the thread pool. Workers take the
// next task from a shared counter, so one slowed down by another process takes fewer; each has
// its own scratch, made once. A worker claims its next task before running the one it has and
// calls ahead(next) first, so that task's first data can be asked for while this one runs.
template <typename MakeScratch, typename Fn, typename Ahead>
void for_each_task(int64_t num_tasks, MakeScratch make_scratch, Fn fn, Ahead ahead) {
  if (num_tasks == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, num_workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    int64_t task = next++;
    if (task < num_tasks) ahead(task);
    while (task < num_tasks) {
      const int64_t following = next++;
      if (following < num_tasks) ahead(following);
      fn(task, scratch);
      task = following;
    }
  });
}

template <typename MakeScratch, typename Fn>
void for_each_task(int64_t num_tasks, MakeScratch make_scratch, Fn fn) {
  for_each_task(num_tasks, make_scratch, fn, [](int64_t) {});
}

// Converts n elements to float32 (exactly: every T is a float32 value).
template <typename T>
inline void to_float(float* __restrict__ out, const T* __restrict__ in, int64_t n) {
  int64_t i = 0;
  for (; i + vec::kWidth <= n; i += vec::kWidth) vec::store(out + i, vec::load(in + i));
  if (i < n) vec::store(out + i, vec::load(in + i, n - i), n - i);
}

// Asks for one KV head's key and value rows of keys [begin, end) (the next tile's, in prefill):
// rows are scattered across pages, and a head's slice is too short for the hardware prefetcher.
// always_inline: GCC 12 finds a separate function made only of prefetches free of side effects
// and drops the call.
template <typename T>
[[gnu::always_inline]] inline void prefetch_head_rows(const Problem<T>& pb, const int32_t* block_table,
                                                      int64_t begin, int64_t end, int64_t kv_head) {
  const int64_t key_bytes = pb.head_dim * static_cast<int64_t>(sizeof(T));
  const int64_t value_bytes = pb.value_dim * static_cast<int64_t>(sizeof(T));
  for (int64_t j = begin; j < end; ++j) {
    const int64_t row = pb.cache_row(pb.slot(block_table, j), kv_head);
    const char* k = reinterpret_cast<const char*>(pb.key_cache + row);
    const char* v = reinterpret_cast<const char*>(pb.value_cache + row);
    for (int64_t byte = 0; byte < key_bytes; byte += 64) __builtin_prefetch(k + byte);
    if (v == k) continue;  // MLA: the values are the keys' rows
    for (int64_t byte = 0; byte < value_bytes; byte += 64) __builtin_prefetch(v + byte);
  }
}

// prefetcht1 (into L2) as an asm statement, which the compiler keeps wherever it is inlined:
// GCC drops calls to functions it finds made only of __builtin_prefetch (free of side effects),
// which a lambda handed to for_each_task is.
[[gnu::always_inline]] inline void prefetch_l2(const char* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht1 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Asks for every KV head's key and value rows of keys [begin, end) (a slot's rows are
// contiguous) to be brought into L2 ahead of their use: decode's tiles, kPrefetchTiles ahead.
// Decode reads each row once, at addresses the block table scatters, and one core has too few
// misses in flight to stream them on demand: decode of SmolLM2's shape read the cache at ~9-11
// GB/s on 2 Zen 4 cores without it, 13-23 GB/s with it (bench_attention.py --decode).
template <typename T>
[[gnu::always_inline]] inline void prefetch_page_rows(const Problem<T>& pb, const int32_t* block_table,
                                                      int64_t begin, int64_t end) {
  const int64_t bytes = pb.num_kv_heads * pb.head_dim * static_cast<int64_t>(sizeof(T));
  for (int64_t j = begin; j < end; ++j) {
    const int64_t row = pb.cache_row(pb.slot(block_table, j), 0);
    const char* k = reinterpret_cast<const char*>(pb.key_cache + row);
    const char* v = reinterpret_cast<const char*>(pb.value_cache + row);
    for (int64_t byte = 0; byte < bytes; byte += 64) prefetch_l2(k + byte);
    if (v == k) continue;  // MLA: the values are the keys' rows
    for (int64_t byte = 0; byte < bytes; byte += 64) prefetch_l2(v + byte);
  }
}

// The first kPrefetchTiles tiles of a decode split: for_each_task's ahead, so that a worker's
// next split starts on rows already asked for (a batch of short sequences is mostly starts).
template <typename T>
[[gnu::always_inline]] inline void prefetch_split_start(const Problem<T>& pb, const DecodeSplit& split) {
  prefetch_page_rows(pb, pb.block_table(split.seq), split.k_begin,
                     std::min(split.k_begin + kPrefetchTiles * kKeyTile, split.k_end));
}

// ---- prefill: an item's rows are the vector lanes --------------------------------------------

// The rows of a prefill work item with one KV head: every (query, query head of the KV head's
// group) pair, row r = query r / group, head r % group of the group, padded to kLanes.
struct ItemRows {
  int64_t token_begin;  // the item's first query token
  int64_t group, first_head;
  int64_t count, padded;  // rows, and rows rounded up to kLanes
  int64_t token(int64_t r) const { return token_begin + r / group; }
  int64_t head(int64_t r) const { return first_head + r % group; }
};

// The item's rows, and each row's visible keys [first_key[r], last_key[r]] ([padded] each); a
// padding row sees none (first 1, last 0). Over the real rows both grow with the row, so row 0
// sees the earliest key any row needs and row count - 1 the latest.
template <typename T>
ItemRows item_rows(const Problem<T>& pb, const WorkItem& item, int64_t kv_head, int32_t* first_key,
                   int32_t* last_key) {
  const int64_t group = pb.group();
  const int64_t k_len = pb.seq_lens_k[item.seq], q_len = pb.q_len(item.seq);
  const int64_t rows = (item.q_end - item.q_begin) * group;
  for (int64_t i = 0; i < item.q_end - item.q_begin; ++i) {
    const int64_t pos = k_len - q_len + item.q_begin + i;
    const int64_t first = first_visible_key(pos, pb.window, pb.chunk);
    for (int64_t r = i * group; r < (i + 1) * group; ++r) {
      first_key[r] = static_cast<int32_t>(first);
      last_key[r] = static_cast<int32_t>(pos);
    }
  }
  const int64_t padded = round_up(rows, kLanes);
  std::fill(first_key + rows, first_key + padded, 1);
  std::fill(last_key + rows, last_key + padded, 0);
  return {pb.cu_seqlens_q[item.seq] + item.q_begin, group, kv_head * group, rows, padded};
}

// key >= first & key <= last, lane-wise: the rows that see key.
inline vec::Mask sees_key(vec::IVec first, vec::IVec last, int64_t key) {
  const vec::IVec k = vec::set1_int(static_cast<int32_t>(key));
  return (first <= k) & (k <= last);
}

// One tile's online-softmax step for kLanes rows at once (row_max, row_sum, alpha point at them),
// lane-wise, so no loop needs a horizontal reduction:
//   m' = max(m, max_j s_j),  alpha = 2^(m - m'),  l' = l * alpha + sum_j 2^(s_j - m').
// scores(j) gives key j's masked log2-domain scores (storing them where probabilities finds them);
// probabilities(shift, sum) stores 2^(s_j - shift) for P.V and returns sum plus those weights.
// A row that has seen no visible key yet keeps m = -inf; shifting it by 0 keeps it NaN-free.
template <typename Scores, typename Probabilities>
inline void online_softmax_update(float* row_max, float* row_sum, float* alpha, int64_t num_keys,
                                  Scores scores, Probabilities probabilities) {
  const vec::Vec old_max = vec::load(row_max);
  vec::Vec new_max = old_max;
  for (int64_t j = 0; j < num_keys; ++j) new_max = vec::max(new_max, scores(j));
  const vec::Vec shift = vec::select(new_max == vec::set1(kNegInf), vec::zero(), new_max);
  const vec::Vec row_alpha = vec::exp2(old_max - shift);
  const vec::Vec sum = probabilities(shift, vec::load(row_sum) * row_alpha);
  vec::store(row_max, new_max);
  vec::store(row_sum, sum);
  vec::store(alpha, row_alpha);
}

// ---- decode ----------------------------------------------------------------------------------

// A split's end: out = acc / sum when it is the whole sequence, else its state for the merge.
// acc: [num_heads, value_dim]; row_max, row_sum: [num_heads].
template <typename T>
void finish_decode_split(const Problem<T>& pb, const DecodeSplit& split, const float* acc,
                         const float* row_max, const float* row_sum, SplitStates states) {
  const int64_t heads = pb.num_heads, dim = pb.value_dim;
  if (split.partial) {
    for (int64_t h = 0; h < heads; ++h) {
      const SplitState state = states.at(*split.partial, h);
      state.max() = row_max[h];
      state.sum() = row_sum[h];
      std::copy_n(acc + h * dim, dim, state.acc());
    }
    return;
  }
  const int64_t token = pb.cu_seqlens_q[split.seq];
  for (int64_t h = 0; h < heads; ++h) {
    T* o = pb.out_row(token, h);
    const float inv_sum = 1.f / row_sum[h];
    for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[h * dim + d] * inv_sum);
  }
}

// ---- bf16 pairs (the AVX512-BF16 kernels) ----------------------------------------------------

#if defined(FASTGEN_VEC_AVX512_BF16)
constexpr int64_t kPairsPerTile = kKeyTile / 2;

// P.V's operand, pairs along keys: values[p, d] = (rows[2p][d], rows[2p + 1][d]) as bf16 pairs
// ([(num_keys + 1) / 2, dim]; a missing last row is zeros). rows: [num_keys] value rows of dim.
FASTGEN_INTRINSICS_BEGIN
inline void pack_value_pairs(uint32_t* __restrict__ values, const c10::BFloat16* const* rows,
                             int64_t num_keys, int64_t dim) {
  for (int64_t p = 0; p < (num_keys + 1) / 2; ++p) {
    const c10::BFloat16* v0 = rows[2 * p];
    const c10::BFloat16* v1 = 2 * p + 1 < num_keys ? rows[2 * p + 1] : nullptr;
    for (int64_t d = 0; d < dim; d += kLanes) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)));
      const __m512i hi = v1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + d)))
                            : _mm512_setzero_si512();
      _mm512_storeu_si512(values + p * dim + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}
FASTGEN_INTRINSICS_END
#endif

}  // namespace fastgen::cpu::attention_kernels
