// What the CPU attention kernels share with their dispatcher (csrc/cpu/attention.cpp): the call's
// inputs (Batch, Problem), the two work plans (prefill items, decode splits), the layout of the
// state a decode split leaves for its merge, and each kernel's entry point. One kernel per file:
//   prefill.cpp       sequences with several queries, any dtype, float32 FMAs
//   prefill_bf16.cpp  the same for bf16 on AVX512-BF16, as bf16 pair dot products
//   decode.cpp        sequences with one query (flash-decoding splits), any dtype; and the merge
//   decode_bf16.cpp   the same for bf16 on AVX512-BF16
//   plan.cpp          the work plans
// The dispatcher picks a kernel per dtype and head size, after planning; the kernels trust their
// inputs (the adapter has checked them).
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include <c10/util/BFloat16.h>

#include "core/attention_mask.h"
#include "cpu/vec.h"

namespace fastgen::cpu::attention_kernels {

constexpr int64_t kLanes = vec::kWidth;  // prefill rows per vector; an item's rows are padded to it
constexpr int64_t kKeyTile = 32;         // keys converted, scored and softmaxed together
constexpr int64_t kPrefetchTiles = 4;    // decode: key tiles asked for ahead of the one scored
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// The call's sequences and sizes: everything but the data, so the planner needs no dtype.
struct Batch {
  const int32_t* cu_seqlens_q;  // [num_seqs + 1]
  const int32_t* seq_lens_k;    // [num_seqs]
  const int32_t* block_tables;  // [num_seqs, max_blocks_per_seq]
  int64_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks_per_seq;
  // The values are the first value_dim <= head_dim elements of each value row (head_dim for
  // standard attention; MLA's latent rows are keys of L + R and values of their first L).
  int64_t value_dim;
  int64_t window, chunk;  // kUnbounded when not given (core/attention_mask.h)

  int64_t q_len(int64_t seq) const { return cu_seqlens_q[seq + 1] - cu_seqlens_q[seq]; }
  int64_t group() const { return num_heads / num_kv_heads; }  // query heads per KV head
  const int32_t* block_table(int64_t seq) const { return block_tables + seq * max_blocks_per_seq; }
  // The cache slot (block * block_size + offset) of key j of the sequence whose row of
  // block_tables is block_table.
  int64_t slot(const int32_t* block_table, int64_t j) const {
    return static_cast<int64_t>(block_table[j / block_size]) * block_size + j % block_size;
  }
  // Where a slot's row for one KV head starts, in key_cache and value_cache alike (elements).
  int64_t cache_row(int64_t slot, int64_t kv_head) const { return (slot * num_kv_heads + kv_head) * head_dim; }
};

// The whole call's inputs, so a kernel's per-task function takes one argument for them.
template <typename T>
struct Problem : Batch {
  T* out;                // [num_tokens, num_heads, value_dim]
  const T* query;        // [num_tokens, num_heads, head_dim], rows query_stride apart
  const T* key_cache;    // [num_blocks, block_size, num_kv_heads, head_dim]
  const T* value_cache;  // [num_blocks, block_size, num_kv_heads, head_dim]
  int64_t query_stride;
  float scale;

  const T* query_row(int64_t token, int64_t head) const { return query + token * query_stride + head * head_dim; }
  T* out_row(int64_t token, int64_t head) const { return out + (token * num_heads + head) * value_dim; }
};

// ---- prefill ---------------------------------------------------------------------------------

// Consecutive queries of one sequence; with a KV head, one unit of parallel work.
struct WorkItem {
  int64_t seq;
  int64_t q_begin;  // query rows [q_begin, q_end) of the sequence, counted from its first
  int64_t q_end;
};

// Sequences with several queries, as blocks of queries, the latest (which see the most keys)
// first, so that the short ones at the end fill in the gaps. Task t is item t / num_kv_heads
// with KV head t % num_kv_heads.
struct PrefillPlan {
  std::vector<WorkItem> items;
  int64_t max_rows;  // the most rows (queries x group heads) of an item, padded to kLanes
};

PrefillPlan plan_prefill(const Batch& batch);

template <typename T>
void prefill(const Problem<T>& problem, const PrefillPlan& plan);  // prefill.cpp
// kHasBf16Pairs builds only, head_dim and value_dim multiples of kLanes.
void prefill_bf16(const Problem<c10::BFloat16>& problem, const PrefillPlan& plan);
inline bool prefill_bf16_takes(const Batch& batch) {
  return batch.head_dim % kLanes == 0 && batch.value_dim % kLanes == 0;
}

// ---- decode ----------------------------------------------------------------------------------

// The state a decode split leaves for its merge when its sequence has several splits, per head:
// its running max and sum (log2 domain) and its unnormalised output, as one row of floats
// [max, sum, acc[value_dim]].
struct SplitState {
  float* row;
  float& max() const { return row[0]; }
  float& sum() const { return row[1]; }
  float* acc() const { return row + 2; }
  static int64_t floats(int64_t value_dim) { return 2 + value_dim; }
};

// Every split's state, [num_partials, num_heads] rows; a sequence's partials are consecutive.
struct SplitStates {
  float* data;  // [num_partials, num_heads, SplitState::floats(value_dim)]
  int64_t num_heads, value_dim;
  static int64_t floats(int64_t num_partials, int64_t num_heads, int64_t value_dim) {
    return num_partials * num_heads * SplitState::floats(value_dim);
  }
  SplitState at(int64_t partial, int64_t head) const {
    return {data + (partial * num_heads + head) * SplitState::floats(value_dim)};
  }
};

// A range of one decode sequence's keys, for all its heads: one unit of parallel work.
struct DecodeSplit {
  int64_t seq;
  int64_t k_begin, k_end;  // keys [k_begin, k_end) of the sequence
  // Which partial its state goes to; none when the split is the whole sequence and writes `out`.
  std::optional<int64_t> partial;
};

// Sequences with one query, as splits of about the same number of keys, and each sequence's run
// of partial states for the merge.
struct DecodePlan {
  std::vector<DecodeSplit> splits;
  struct Merge {
    int64_t seq, first_partial, num_splits;
  };
  std::vector<Merge> merges;
  int64_t num_partials = 0;
};

DecodePlan plan_decode(const Batch& batch);

template <typename T>
void decode(const Problem<T>& problem, const DecodePlan& plan, SplitStates states);  // decode.cpp
// kHasBf16Pairs builds only, head_dim and value_dim multiples of 2 * kLanes.
void decode_bf16(const Problem<c10::BFloat16>& problem, const DecodePlan& plan, SplitStates states);
inline bool decode_bf16_takes(const Batch& batch) {
  return batch.head_dim % (2 * kLanes) == 0 && batch.value_dim % (2 * kLanes) == 0;
}

// out for every sequence with several splits, from their states (decode.cpp).
template <typename T>
void merge_decode_splits(const Problem<T>& problem, const DecodePlan& plan, SplitStates states);

}  // namespace fastgen::cpu::attention_kernels
