// The CPU attention's work plans: how a batch is cut into tasks for the thread pool. Prefill
// sequences (several queries) become blocks of queries, each taken with one KV head; decode
// sequences (one query) become splits of their visible keys, cut only as finely as the thread
// pool needs. Both read only the batch's metadata, never its data.
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>

#include "core/attention_mask.h"
#include "cpu/attention/problem.h"

namespace fastgen::cpu::attention_kernels {

namespace {

constexpr int64_t kRowsPerItem = 64;    // target rows (queries x group heads) of a prefill item
constexpr int64_t kMinSplitKeys = 256;  // shorter splits cost more in merging than they gain
constexpr int64_t kTasksPerWorker = 4;  // decode splits per worker, when the keys allow

// Keys [first, end) that sequence b's only query sees.
std::pair<int64_t, int64_t> decode_keys(const Batch& batch, int64_t b) {
  const int64_t pos = batch.seq_lens_k[b] - 1;
  return {first_visible_key(pos, batch.window, batch.chunk), pos + 1};
}

}  // namespace

PrefillPlan plan_prefill(const Batch& batch) {
  const int64_t group = batch.group();
  const int64_t queries_per_item = std::max<int64_t>(1, kRowsPerItem / group);
  PrefillPlan plan{{}, round_up(queries_per_item * group, kLanes)};
  for (int64_t b = 0; b < batch.num_seqs; ++b) {
    const int64_t q_len = batch.q_len(b);
    if (q_len <= 1) continue;
    for (int64_t q = 0; q < q_len; q += queries_per_item) {
      plan.items.push_back({b, q, std::min(q + queries_per_item, q_len)});
    }
  }
  std::sort(plan.items.begin(), plan.items.end(),
            [](const WorkItem& a, const WorkItem& b) { return a.q_end > b.q_end; });
  return plan;
}

// Splits of about the same number of keys: enough of them for kTasksPerWorker tasks a worker when
// the keys allow (a sequence is cut only when that leaves >= kMinSplitKeys keys a split).
DecodePlan plan_decode(const Batch& batch) {
  int64_t total_keys = 0;
  for (int64_t b = 0; b < batch.num_seqs; ++b) {
    if (batch.q_len(b) != 1) continue;
    const auto [first, end] = decode_keys(batch, b);
    total_keys += end - first;
  }
  const int64_t target_tasks = kTasksPerWorker * at::get_num_threads();
  const int64_t split_keys =
      std::max(kMinSplitKeys, round_up((total_keys + target_tasks - 1) / target_tasks, kKeyTile));
  DecodePlan plan;
  for (int64_t b = 0; b < batch.num_seqs; ++b) {
    if (batch.q_len(b) != 1) continue;
    const auto [first, end] = decode_keys(batch, b);
    const int64_t num_splits = (end - first + split_keys - 1) / split_keys;
    if (num_splits == 1) {
      plan.splits.push_back({b, first, end, std::nullopt});
      continue;
    }
    plan.merges.push_back({b, plan.num_partials, num_splits});
    for (int64_t k = first; k < end; k += split_keys) {
      plan.splits.push_back({b, k, std::min(k + split_keys, end), plan.num_partials++});
    }
  }
  return plan;
}

}  // namespace fastgen::cpu::attention_kernels
