// Paged causal attention on the CPU, flash-attention style: float32 online softmax over tiles of
// kKeyTile keys, never materialising a [q_len, k_len] score matrix.
//
// A work item is (sequence, KV head, block of consecutive queries). Its rows are every (query,
// query head of the KV head's group) pair, so GQA heads sharing a KV head, and all queries of the
// block, reuse each key / value row once it is converted to float32. Rows are the vector lanes:
// queries are stored transposed ([D, rows]) so a score tile is rows-wide FMAs broadcasting one key
// element at a time, and the softmax max / sum are lane-wise too; no loop needs a horizontal
// reduction. The hot loops use GCC / Clang vector types (16 float32 lanes, one AVX-512 register
// under -march=native) so that partial sums stay in registers and exp2 is vectorised without
// -ffast-math. Items go round-robin to workers, which balances causal prefill (later query blocks
// see more keys). Any head size works; multiples of 16 take the vector paths throughout.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/checks.h"
#include "core/dispatch.h"
#include "cpu/attention.h"
#include "ops.h"

namespace fastgen::cpu {

namespace {

constexpr int64_t kLanes = 16;        // float32 lanes of an AVX-512 register; rows are padded to it
constexpr int64_t kKeyTile = 32;      // keys converted, scored and softmaxed together
constexpr int64_t kRowsPerItem = 64;  // target rows (queries x group heads) of one work item
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// kLanes float32 / int32 lanes as one value: GCC and Clang lower it to one AVX-512 register (or
// two AVX2 / four SSE ones). Written as vector types, not left to the auto-vectoriser, so that
// partial sums provably stay in registers and exp2 vectorises without -ffast-math.
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline IVec load(const int32_t* p) {
  IVec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline Vec splat(float x) { return Vec{} + x; }
inline Vec max(Vec a, Vec b) { return a > b ? a : b; }

// 2^x lane-wise. Cephes' polynomial on [-0.5, 0.5] after taking out the nearest integer n (by the
// add-and-subtract-1.5*2^23 trick, exact for |x| < 2^22): relative error ~1e-7. Lanes with
// x < -126 (the -inf of masked scores included) give exactly 0; x must be <= 127.
inline Vec exp2_lanes(Vec x) {
  const IVec underflow = x < -126.f;
  const Vec clamped = underflow ? splat(-126.f) : x;
  const Vec n = (clamped + 12582912.f) - 12582912.f;
  const Vec f = clamped - n;
  Vec p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const Vec two_n = (Vec)((__builtin_convertvector(n, IVec) + 127) << 23);
  return underflow ? splat(0.f) : p * two_n;
}

// Consecutive queries of one sequence; with a KV head, one unit of parallel work.
struct WorkItem {
  int64_t seq;
  int64_t q_begin;  // query rows [q_begin, q_end) of the sequence, counted from its first
  int64_t q_end;
};

// The whole call's inputs, so the per-item function takes one argument for them.
template <typename T>
struct Problem {
  T* out;                       // [num_tokens, num_heads, head_dim]
  const T* query;               // [num_tokens, num_heads, head_dim], rows query_stride apart
  const T* key_cache;           // [num_blocks, block_size, num_kv_heads, head_dim]
  const T* value_cache;         // [num_blocks, block_size, num_kv_heads, head_dim]
  const int32_t* cu_seqlens_q;  // [num_seqs + 1]
  const int32_t* seq_lens_k;    // [num_seqs]
  const int32_t* block_tables;  // [num_seqs, max_blocks_per_seq]
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks_per_seq, query_stride;
  float scale;
  // No window / no chunk are the infinite ones: p - j < INT64_MAX and j / INT64_MAX == 0 always.
  int64_t window, chunk;
};

// One worker's buffers, sized for the largest item and reused across its items.
struct Scratch {
  explicit Scratch(int64_t max_rows, int64_t head_dim)
      : queries_t(head_dim * max_rows), scores(kKeyTile * max_rows), keys(kKeyTile * head_dim),
        values(kKeyTile * head_dim), acc(max_rows * head_dim), row_max(max_rows),
        row_sum(max_rows), alpha(max_rows),
        first_key(max_rows), last_key(max_rows) {}
  std::vector<float> queries_t;  // [head_dim, rows]: queries * scale * log2(e), transposed
  std::vector<float> scores;     // [kKeyTile, rows]: log2-domain scores, then probabilities
  std::vector<float> keys;       // [kKeyTile, head_dim]
  std::vector<float> values;     // [kKeyTile, head_dim]
  std::vector<float> acc;        // [rows, head_dim]: unnormalised output
  std::vector<float> row_max, row_sum, alpha;  // [rows]
  std::vector<int32_t> first_key, last_key;                     // [rows]: visible keys, inclusive
};

// scores[j, r] = sum_d queries_t[d, r] * keys[j, d] for kKeys keys at once: independent FMA
// chains (one FMA's latency would otherwise bound the loop), each queries_t load used kKeys times.
template <int64_t kKeys>
inline void score_keys(float* __restrict__ scores, const float* __restrict__ queries_t,
                       const float* __restrict__ keys, int64_t rows, int64_t head_dim) {
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
    Vec sum[kKeys] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const Vec q = load(queries_t + d * rows + r0);
      for (int64_t i = 0; i < kKeys; ++i) sum[i] += q * keys[i * head_dim + d];
    }
    for (int64_t i = 0; i < kKeys; ++i) store(scores + i * rows + r0, sum[i]);
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
  Vec sum[kChunks];
  for (int64_t c = 0; c < kChunks; ++c) sum[c] = load(acc + c * kLanes) * alpha;
  for (int64_t j = 0; j < num_keys; ++j) {
    const float w = weights[j * weight_stride];
    for (int64_t c = 0; c < kChunks; ++c) sum[c] += load(values + j * head_dim + c * kLanes) * w;
  }
  for (int64_t c = 0; c < kChunks; ++c) store(acc + c * kLanes, sum[c]);
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
  const int64_t group = pb.num_heads / pb.num_kv_heads, dim = pb.head_dim;
  const int64_t token_begin = pb.cu_seqlens_q[item.seq] + item.q_begin;
  const int64_t q_len = pb.cu_seqlens_q[item.seq + 1] - pb.cu_seqlens_q[item.seq];
  const int64_t k_len = pb.seq_lens_k[item.seq];
  const int64_t num_queries = item.q_end - item.q_begin;
  const int64_t rows = num_queries * group;  // row r = query r / group, head r % group of the group
  const int64_t padded_rows = round_up(rows, kLanes);
  float* queries_t = s.queries_t.data();
  const float q_scale = pb.scale * kLog2e;

  for (int64_t i = 0; i < num_queries; ++i) {
    const int64_t pos = k_len - q_len + item.q_begin + i;
    const int64_t first = std::max({int64_t{0}, pos - pb.window + 1, pos / pb.chunk * pb.chunk});
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = i * group + g;
      s.first_key[r] = static_cast<int32_t>(first);
      s.last_key[r] = static_cast<int32_t>(pos);
      const T* q = pb.query + (token_begin + i) * pb.query_stride + (kv_head * group + g) * dim;
      for (int64_t d = 0; d < dim; ++d) queries_t[d * padded_rows + r] = static_cast<float>(q[d]) * q_scale;
    }
  }
  for (int64_t r = rows; r < padded_rows; ++r) {  // padding rows: no visible keys, zero queries
    s.first_key[r] = 1;
    s.last_key[r] = 0;
    for (int64_t d = 0; d < dim; ++d) queries_t[d * padded_rows + r] = 0.f;
  }
  std::fill_n(s.row_max.begin(), padded_rows, kNegInf);
  std::fill_n(s.row_sum.begin(), padded_rows, 0.f);
  std::fill_n(s.acc.begin(), rows * dim, 0.f);

  // first_key / last_key grow with the query, so the first row sees the earliest key needed and
  // the last row the latest.
  const int64_t keys_begin = s.first_key[0], keys_end = s.last_key[rows - 1] + 1;
  const int32_t* block_table = pb.block_tables + item.seq * pb.max_blocks_per_seq;
  for (int64_t j0 = keys_begin; j0 < keys_end; j0 += kKeyTile) {
    const int64_t num_keys = std::min(kKeyTile, keys_end - j0);

    // Convert the tile's key / value rows to float32, and ask for the next tile's rows: one head's
    // slice of each cache row is too short and scattered for the hardware prefetcher.
    const int64_t next_end = std::min(j0 + 2 * kKeyTile, keys_end);
    for (int64_t j = j0; j < next_end; ++j) {
      const int64_t slot = static_cast<int64_t>(block_table[j / pb.block_size]) * pb.block_size +
                           j % pb.block_size;
      const T* k = pb.key_cache + (slot * pb.num_kv_heads + kv_head) * dim;
      const T* v = pb.value_cache + (slot * pb.num_kv_heads + kv_head) * dim;
      if (j >= j0 + kKeyTile) {
        for (int64_t byte = 0; byte < dim * static_cast<int64_t>(sizeof(T)); byte += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(k) + byte);
          __builtin_prefetch(reinterpret_cast<const char*>(v) + byte);
        }
        continue;
      }
      float* kf = s.keys.data() + (j - j0) * dim;
      float* vf = s.values.data() + (j - j0) * dim;
      for (int64_t d = 0; d < dim; ++d) kf[d] = static_cast<float>(k[d]);
      for (int64_t d = 0; d < dim; ++d) vf[d] = static_cast<float>(v[d]);
    }

    float* scores = s.scores.data();
    score_tile(scores, queries_t, s.keys.data(), num_keys, padded_rows, dim);

    // Mask, then the online-softmax update, lane-wise over rows.
    const int32_t* first_key = s.first_key.data();
    const int32_t* last_key = s.last_key.data();
    float* row_max = s.row_max.data();
    float* row_sum = s.row_sum.data();
    float* alpha = s.alpha.data();
    for (int64_t r0 = 0; r0 < padded_rows; r0 += kLanes) {
      const IVec first = load(first_key + r0), last = load(last_key + r0);
      const Vec old_max = load(row_max + r0);
      Vec new_max = old_max;
      for (int64_t j = 0; j < num_keys; ++j) {
        const int32_t key = static_cast<int32_t>(j0 + j);
        float* sj = scores + j * padded_rows + r0;
        const Vec v = (key >= first) & (key <= last) ? load(sj) : splat(kNegInf);
        store(sj, v);
        new_max = max(new_max, v);
      }
      // A row that has seen no visible key yet keeps max -inf; shifting by 0 keeps it NaN-free.
      const Vec row_shift = new_max == kNegInf ? splat(0.f) : new_max;
      const Vec row_alpha = exp2_lanes(old_max - row_shift);
      Vec sum = load(row_sum + r0) * row_alpha;
      for (int64_t j = 0; j < num_keys; ++j) {
        float* sj = scores + j * padded_rows + r0;
        const Vec p = exp2_lanes(load(sj) - row_shift);
        store(sj, p);
        sum += p;
      }
      store(row_max + r0, new_max);
      store(row_sum + r0, sum);
      store(alpha + r0, row_alpha);
    }

    for (int64_t r = 0; r < rows; ++r) {
      // Only the row's visible keys: the masked ones have weight 0.
      const int64_t jb = std::max<int64_t>(first_key[r], j0) - j0;
      const int64_t je = std::max(jb, std::min<int64_t>(last_key[r] + 1, j0 + num_keys) - j0);
      if (jb == je && alpha[r] == 1.f) continue;
      add_weighted_values(s.acc.data() + r * dim, alpha[r], scores + jb * padded_rows + r,
                          padded_rows, s.values.data() + jb * dim, je - jb, dim);
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    // row_sum >= the weight of the query's own position, exp2(0) scaled: never 0.
    const float inv_sum = 1.f / s.row_sum[r];
    const int64_t head = kv_head * group + r % group;
    T* o = pb.out + ((token_begin + r / group) * pb.num_heads + head) * dim;
    const float* acc = s.acc.data() + r * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[d] * inv_sum);
  }
}

}  // namespace

template <typename T>
void attention_launch(T* out, const T* query, const T* key_cache, const T* value_cache,
                      const int32_t* cu_seqlens_q, const int32_t* seq_lens_k,
                      const int32_t* block_tables, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                      int64_t max_blocks_per_seq, int64_t query_stride, float scale,
                      std::optional<int64_t> sliding_window, std::optional<int64_t> chunk_size) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t queries_per_item = std::max<int64_t>(1, kRowsPerItem / group);
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = cu_seqlens_q[b + 1] - cu_seqlens_q[b];
    for (int64_t q = 0; q < q_len; q += queries_per_item) {
      items.push_back({b, q, std::min(q + queries_per_item, q_len)});
    }
  }
  const int64_t num_tasks = static_cast<int64_t>(items.size()) * num_kv_heads;
  if (num_tasks == 0) return;

  constexpr int64_t kUnbounded = std::numeric_limits<int64_t>::max();
  const Problem<T> problem{out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k,
                           block_tables, num_heads, num_kv_heads, head_dim, block_size,
                           max_blocks_per_seq, query_stride, scale,
                           sliding_window.value_or(kUnbounded), chunk_size.value_or(kUnbounded)};
  const int64_t max_rows = round_up(queries_per_item * group, kLanes);
  const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, num_workers, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(max_rows, head_dim);
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t task = worker; task < num_tasks; task += num_workers) {
        attend_item(problem, items[task / num_kv_heads], task % num_kv_heads, scratch);
      }
    }
  });
}

#define FASTGEN_INSTANTIATE(T)                                                                  \
  template void attention_launch<T>(T*, const T*, const T*, const T*, const int32_t*,           \
                                    const int32_t*, const int32_t*, int64_t, int64_t, int64_t,  \
                                    int64_t, int64_t, int64_t, int64_t, float,                  \
                                    std::optional<int64_t>, std::optional<int64_t>);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(c10::Half)
FASTGEN_INSTANTIATE(c10::BFloat16)
#undef FASTGEN_INSTANTIATE

namespace {

// Shapes, dtypes and optional arguments: everything that can be checked without reading data.
// csrc/cuda/attention.cu makes the same checks (each backend's adapter is self-contained).
void check_attention_args(const char* op, const at::Tensor& out, const at::Tensor& query,
                          const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                          const at::Tensor& block_tables, std::optional<int64_t> sliding_window,
                          std::optional<int64_t> chunk_size) {
  FASTGEN_CHECK_DIM(op, query, 3);
  FASTGEN_CHECK_DIM(op, key_cache, 4);
  FASTGEN_CHECK_DIM(op, cu_seqlens_q, 1);
  FASTGEN_CHECK_DIM(op, seq_lens_k, 1);
  FASTGEN_CHECK_DIM(op, block_tables, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, out);
  FASTGEN_CHECK_CONTIGUOUS(op, key_cache);
  FASTGEN_CHECK_CONTIGUOUS(op, value_cache);
  FASTGEN_CHECK_CONTIGUOUS(op, cu_seqlens_q);
  FASTGEN_CHECK_CONTIGUOUS(op, seq_lens_k);
  FASTGEN_CHECK_CONTIGUOUS(op, block_tables);
  FASTGEN_CHECK_DTYPE(op, cu_seqlens_q, at::kInt);
  FASTGEN_CHECK_DTYPE(op, seq_lens_k, at::kInt);
  FASTGEN_CHECK_DTYPE(op, block_tables, at::kInt);
  FASTGEN_CHECK_SAME_DTYPE(op, out, query);
  FASTGEN_CHECK_SAME_DTYPE(op, key_cache, query);
  FASTGEN_CHECK_SAME_DTYPE(op, value_cache, query);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &out, &key_cache, &value_cache, &cu_seqlens_q, &seq_lens_k, &block_tables}) {
    TORCH_CHECK(t->device() == query.device(), op, ": every tensor must be on ", query.device(),
                " (the device of query), got one on ", t->device());
  }
  TORCH_CHECK(out.sizes() == query.sizes(), op, ": out shape ", out.sizes(), " != query shape ",
              query.sizes());
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2), op,
              ": each query row's [Hq, D] must be contiguous (only stride(0) may differ), got strides ",
              query.strides());
  TORCH_CHECK(key_cache.size(1) >= 1, op, ": key_cache block size must be >= 1, got shape ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, ": value_cache shape ",
              value_cache.sizes(), " != key_cache shape ", key_cache.sizes());
  TORCH_CHECK(key_cache.size(3) == query.size(2), op, ": key_cache head size ", key_cache.size(3),
              " != query head size ", query.size(2));
  TORCH_CHECK(key_cache.size(2) >= 1 && query.size(1) % key_cache.size(2) == 0, op, ": ",
              query.size(1), " query heads do not split into ", key_cache.size(2), " KV heads");
  const int64_t num_seqs = seq_lens_k.size(0);
  TORCH_CHECK(cu_seqlens_q.size(0) == num_seqs + 1, op, ": cu_seqlens_q must be [",
              num_seqs + 1, "] (seq_lens_k has ", num_seqs, " sequences), got ",
              cu_seqlens_q.sizes());
  TORCH_CHECK(block_tables.size(0) == num_seqs, op, ": block_tables must have ", num_seqs,
              " rows (one per sequence), got shape ", block_tables.sizes());
  TORCH_CHECK(!sliding_window || *sliding_window >= 1, op, ": sliding_window must be >= 1, got ",
              sliding_window.value_or(0));
  TORCH_CHECK(!chunk_size || *chunk_size >= 1, op, ": chunk_size must be >= 1, got ",
              chunk_size.value_or(0));
}

}  // namespace

void attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
               const at::Tensor& value_cache, const at::Tensor& cu_seqlens_q,
               const at::Tensor& seq_lens_k, const at::Tensor& block_tables, int64_t max_seqlen_q,
               int64_t max_seqlen_k, double scale, std::optional<int64_t> sliding_window,
               std::optional<int64_t> chunk_size) {
  constexpr const char* op = "attention";
  check_attention_args(op, out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k,
                       block_tables, sliding_window, chunk_size);
  // The metadata is on the host, so its consistency is checked here too (the kernel trusts it).
  const int64_t num_seqs = seq_lens_k.size(0), num_blocks = key_cache.size(0);
  const int64_t block_size = key_cache.size(1), max_blocks = block_tables.size(1);
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* k_lens = seq_lens_k.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && cu[num_seqs] == query.size(0), op,
              ": cu_seqlens_q must run from 0 to the number of query tokens ", query.size(0),
              ", got ", cu[0], " .. ", cu[num_seqs]);
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = cu[b + 1] - cu[b], k_len = k_lens[b];
    TORCH_CHECK(q_len >= 0, op, ": cu_seqlens_q must be non-decreasing, got ", cu[b], " then ",
                cu[b + 1], " at sequence ", b);
    TORCH_CHECK(q_len <= k_len && k_len <= max_blocks * block_size, op, ": sequence ", b,
                " has ", q_len, " queries and ", k_len, " keys; need q_len <= k_len <= ",
                max_blocks * block_size, " (block_tables width x block size)");
    TORCH_CHECK(q_len <= max_seqlen_q && k_len <= max_seqlen_k, op, ": sequence ", b, " (q_len ",
                q_len, ", k_len ", k_len, ") exceeds max_seqlen_q ", max_seqlen_q,
                " / max_seqlen_k ", max_seqlen_k);
    if (q_len == 0) continue;
    for (int64_t i = 0; i < (k_len + block_size - 1) / block_size; ++i) {
      const int32_t block = tables[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, op, ": block_tables[", b, ", ", i, "] = ",
                  block, " is not a cache block (the cache has ", num_blocks, ")");
    }
  }
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    attention_launch<scalar_t>(out.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(),
                               key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>(),
                               cu, k_lens, tables, num_seqs, query.size(1), key_cache.size(2),
                               query.size(2), block_size, max_blocks, query.stride(0),
                               static_cast<float>(scale), sliding_window, chunk_size);
  });
}

}  // namespace fastgen::cpu
