// Paged causal attention on the CPU, flash-attention style: float32 online softmax over tiles of
// kKeyTile keys, never materialising a [q_len, k_len] score matrix. Three kernels:
//
// Prefill (a sequence with several queries). A work item is (sequence, KV head, block of
// consecutive queries). Its rows are every (query, query head of the KV head's group) pair, so
// GQA heads sharing a KV head, and all queries of the block, reuse each key / value row. Rows are
// the vector lanes: queries are stored transposed ([D, rows]) so a score tile is rows-wide
// multiply-adds broadcasting one key element (or pair) at a time, and the softmax max / sum are
// lane-wise too; no loop needs a horizontal reduction. Items go to workers latest query block
// first (those see the most keys), taken from a shared counter.
//  - bf16 with AVX512-BF16 (attend_item_bf16): both products as bf16 pair dot products
//    (VDPBF16PS), probabilities rounded to bf16 for P.V, as flash-attention does on GPUs.
//  - everything else (attend_item): keys and values converted to float32, float32 FMAs. The hot
//    loops use GCC / Clang vector types (16 float32 lanes, one AVX-512 register under
//    -march=native) so that partial sums stay in registers and exp2 vectorises without
//    -ffast-math.
// Decode (a sequence with one query, attend_decode_split): flash-decoding; see its section.
// Any head size works; multiples of 16 take the vector paths throughout.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cpu/attention.h"
#include "cpu/vec.h"
#include "ops.h"

// GCC 12 reports -Wmaybe-uninitialized inside its own AVX-512 intrinsics wherever they are
// inlined (GCC bug 105593; see cpu/vec.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace fastgen::cpu {

namespace {

constexpr int64_t kLanes = 16;        // float32 lanes of an AVX-512 register; rows are padded to it
constexpr int64_t kKeyTile = 32;      // keys converted, scored and softmaxed together
constexpr int64_t kRowsPerItem = 64;  // target rows (queries x group heads) of one work item
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
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

  // The cache slot (block * block_size + offset) of key j of the sequence whose row of
  // block_tables is block_table.
  int64_t slot(const int32_t* block_table, int64_t j) const {
    return static_cast<int64_t>(block_table[j / block_size]) * block_size + j % block_size;
  }
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
      const int64_t slot = pb.slot(block_table, j);
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

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// ---------------------------------------------------------------------------------------------
// bf16 prefill on AVX512-BF16: both products as VDPBF16PS, which multiplies pairs of bf16 and
// adds both products to a float32 lane (32 multiply-adds an instruction, twice the float32 FMA).
// Rows stay the lanes. Q.K^T pairs along head_dim: queries are packed once per item as
// [head_dim / 2, rows] 32-bit pairs, and a key row's consecutive bf16 already are such pairs, so
// each is broadcast straight from the tile's copy. P.V pairs along keys: probabilities are
// rounded to bf16 (what flash-attention does on GPUs) and packed [kKeyTile / 2, rows], values
// once per tile [kKeyTile / 2, head_dim]. Rounding P to bf16 is a relative error of 2^-9 on each
// weight; the row sums add the rounded weights, so the output stays a weighted mean of values.
// ---------------------------------------------------------------------------------------------
#define FASTGEN_ATTENTION_BF16_DOT 1

constexpr int64_t kPairsPerTile = kKeyTile / 2;

inline __m512bh as_bf16_pairs(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// Two float32 vectors rounded to bf16 (to nearest even) and interleaved as 32-bit pairs (a, b).
inline __m512i pack_bf16_pairs(Vec a, Vec b) {
  const __m256bh ha = _mm512_cvtneps_pbh(a), hb = _mm512_cvtneps_pbh(b);
  return _mm512_or_si512(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(ha)),
                         _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(hb)), 16));
}
// The float32 values of a packed pair vector's low / high halves.
inline Vec low_half(__m512i pairs) { return (Vec)_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
inline Vec high_half(__m512i pairs) {
  return (Vec)_mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(-65536)));
}

struct Bf16Scratch {
  explicit Bf16Scratch(int64_t max_rows, int64_t head_dim)
      : queries(head_dim / 2 * max_rows), keys(kKeyTile * head_dim / 2),
        values(kPairsPerTile * head_dim), scores(kKeyTile * max_rows),
        probs(kPairsPerTile * max_rows), acc(head_dim * max_rows), row_max(max_rows),
        row_sum(max_rows), alpha(max_rows), first_key(max_rows), last_key(max_rows) {}
  std::vector<uint32_t> queries;  // [head_dim / 2, rows]: bf16 pairs (q[r, 2i], q[r, 2i + 1])
  std::vector<uint32_t> keys;     // [kKeyTile, head_dim / 2]: the tile's key rows, zero past it
  std::vector<uint32_t> values;   // [kKeyTile / 2, head_dim]: bf16 pairs (v[2i, d], v[2i + 1, d])
  std::vector<float> scores;      // [kKeyTile, rows]: log2-domain scores
  std::vector<uint32_t> probs;    // [kKeyTile / 2, rows]: bf16 pairs (p[r, 2i], p[r, 2i + 1])
  std::vector<float> acc;         // [head_dim, rows]: unnormalised output, transposed
  std::vector<float> row_max, row_sum, alpha;  // [rows]
  std::vector<int32_t> first_key, last_key;    // [rows]: visible keys, inclusive
};

// scores[j, r] = sum_d q[r, d] k[j, d] for kKeys keys and kBlocks x 16 rows: kBlocks x kKeys
// independent accumulators; each query load is used kKeys times, each key broadcast kBlocks times.
template <int kBlocks, int kKeys>
inline void dot_keys_bf16(float* __restrict__ scores, const uint32_t* __restrict__ queries,
                          const uint32_t* __restrict__ keys, int64_t rows, int64_t half_dim) {
  __m512 sum[kBlocks][kKeys];
  for (int b = 0; b < kBlocks; ++b)
    for (int i = 0; i < kKeys; ++i) sum[b][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < half_dim; ++p) {
    __m512bh q[kBlocks];
    for (int b = 0; b < kBlocks; ++b) q[b] = as_bf16_pairs(_mm512_loadu_si512(queries + p * rows + b * kLanes));
    for (int i = 0; i < kKeys; ++i) {
      const __m512bh k = as_bf16_pairs(_mm512_set1_epi32(static_cast<int>(keys[i * half_dim + p])));
      for (int b = 0; b < kBlocks; ++b) sum[b][i] = _mm512_dpbf16_ps(sum[b][i], q[b], k);
    }
  }
  for (int b = 0; b < kBlocks; ++b)
    for (int i = 0; i < kKeys; ++i) _mm512_storeu_ps(scores + i * rows + b * kLanes, sum[b][i]);
}

// acc[d, r] = acc[d, r] * alpha[r] + sum_j p[r, j] v[j, d] for kDims dims and kBlocks x 16 rows.
template <int kBlocks, int kDims>
inline void add_values_bf16(float* __restrict__ acc, const float* __restrict__ alpha,
                            const uint32_t* __restrict__ probs, const uint32_t* __restrict__ values,
                            int64_t num_pairs, int64_t rows, int64_t dim) {
  __m512 sum[kBlocks][kDims];
  for (int b = 0; b < kBlocks; ++b) {
    const __m512 a = _mm512_loadu_ps(alpha + b * kLanes);
    for (int i = 0; i < kDims; ++i) sum[b][i] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * rows + b * kLanes), a);
  }
  for (int64_t p = 0; p < num_pairs; ++p) {
    __m512bh w[kBlocks];
    for (int b = 0; b < kBlocks; ++b) w[b] = as_bf16_pairs(_mm512_loadu_si512(probs + p * rows + b * kLanes));
    for (int i = 0; i < kDims; ++i) {
      const __m512bh v = as_bf16_pairs(_mm512_set1_epi32(static_cast<int>(values[p * dim + i])));
      for (int b = 0; b < kBlocks; ++b) sum[b][i] = _mm512_dpbf16_ps(sum[b][i], w[b], v);
    }
  }
  for (int b = 0; b < kBlocks; ++b)
    for (int i = 0; i < kDims; ++i) _mm512_storeu_ps(acc + i * rows + b * kLanes, sum[b][i]);
}

// One item of bf16 prefill (head_dim a multiple of 16): as attend_item, with the products above.
void attend_item_bf16(const Problem<c10::BFloat16>& pb, const WorkItem& item, int64_t kv_head,
                      Bf16Scratch& s) {
  const int64_t group = pb.num_heads / pb.num_kv_heads, dim = pb.head_dim, half_dim = dim / 2;
  const int64_t token_begin = pb.cu_seqlens_q[item.seq] + item.q_begin;
  const int64_t q_len = pb.cu_seqlens_q[item.seq + 1] - pb.cu_seqlens_q[item.seq];
  const int64_t k_len = pb.seq_lens_k[item.seq];
  const int64_t num_queries = item.q_end - item.q_begin;
  const int64_t rows = num_queries * group;  // row r = query r / group, head r % group of the group
  const int64_t padded_rows = round_up(rows, kLanes);
  uint32_t* queries = s.queries.data();

  for (int64_t i = 0; i < num_queries; ++i) {
    const int64_t pos = k_len - q_len + item.q_begin + i;
    const int64_t first = std::max({int64_t{0}, pos - pb.window + 1, pos / pb.chunk * pb.chunk});
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = i * group + g;
      s.first_key[r] = static_cast<int32_t>(first);
      s.last_key[r] = static_cast<int32_t>(pos);
      const c10::BFloat16* q = pb.query + (token_begin + i) * pb.query_stride + (kv_head * group + g) * dim;
      for (int64_t p = 0; p < half_dim; ++p) std::memcpy(queries + p * padded_rows + r, q + 2 * p, 4);
    }
  }
  for (int64_t r = rows; r < padded_rows; ++r) {  // padding rows: zero queries, never masked
    for (int64_t p = 0; p < half_dim; ++p) queries[p * padded_rows + r] = 0;
  }
  std::fill_n(s.row_max.begin(), padded_rows, kNegInf);
  std::fill_n(s.row_sum.begin(), padded_rows, 0.f);
  std::fill_n(s.acc.begin(), dim * padded_rows, 0.f);

  const int64_t keys_begin = s.first_key[0], keys_end = s.last_key[rows - 1] + 1;
  // Every row sees keys [latest_first, earliest_last]; tiles inside need no mask.
  const int64_t latest_first = s.first_key[rows - 1], earliest_last = s.last_key[0];
  const int32_t* block_table = pb.block_tables + item.seq * pb.max_blocks_per_seq;
  const Vec log2_scale = splat(pb.scale * kLog2e);
  for (int64_t j0 = keys_begin; j0 < keys_end; j0 += kKeyTile) {
    const int64_t num_keys = std::min(kKeyTile, keys_end - j0);
    const int64_t num_pairs = (num_keys + 1) / 2;

    // Copy the tile's key rows, pack its value rows in pairs, prefetch the next tile's rows.
    const int64_t next_end = std::min(j0 + 2 * kKeyTile, keys_end);
    const c10::BFloat16* value_rows[kKeyTile];
    for (int64_t j = j0; j < next_end; ++j) {
      const int64_t slot = pb.slot(block_table, j);
      const c10::BFloat16* k = pb.key_cache + (slot * pb.num_kv_heads + kv_head) * dim;
      const c10::BFloat16* v = pb.value_cache + (slot * pb.num_kv_heads + kv_head) * dim;
      if (j >= j0 + kKeyTile) {
        for (int64_t byte = 0; byte < dim * 2; byte += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(k) + byte);
          __builtin_prefetch(reinterpret_cast<const char*>(v) + byte);
        }
        continue;
      }
      std::memcpy(s.keys.data() + (j - j0) * half_dim, k, dim * 2);
      value_rows[j - j0] = v;
    }
    const int64_t scored_keys = round_up(num_keys, 8);
    std::fill(s.keys.begin() + num_keys * half_dim, s.keys.begin() + scored_keys * half_dim, 0u);
    for (int64_t p = 0; p < num_pairs; ++p) {
      const c10::BFloat16* v0 = value_rows[2 * p];
      const c10::BFloat16* v1 = 2 * p + 1 < num_keys ? value_rows[2 * p + 1] : nullptr;
      for (int64_t d = 0; d < dim; d += kLanes) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)));
        const __m512i hi = v1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + d)))
                              : _mm512_setzero_si512();
        _mm512_storeu_si512(s.values.data() + p * dim + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }

    float* scores = s.scores.data();
    const uint32_t* keys = s.keys.data();
    int64_t r0 = 0;
    for (; r0 + 2 * kLanes <= padded_rows; r0 += 2 * kLanes) {
      for (int64_t j = 0; j < scored_keys; j += 8) {
        dot_keys_bf16<2, 8>(scores + j * padded_rows + r0, queries + r0, keys + j * half_dim, padded_rows, half_dim);
      }
    }
    if (r0 < padded_rows) {
      for (int64_t j = 0; j < scored_keys; j += 8) {
        dot_keys_bf16<1, 8>(scores + j * padded_rows + r0, queries + r0, keys + j * half_dim, padded_rows, half_dim);
      }
    }

    // Scale, mask (only tiles that reach past some row's visible keys), online softmax; the
    // probabilities leave as bf16 pairs, and the sums add exactly those rounded values.
    const bool needs_mask = j0 < latest_first || j0 + num_keys - 1 > earliest_last;
    uint32_t* probs = s.probs.data();
    for (r0 = 0; r0 < padded_rows; r0 += kLanes) {
      const IVec first = load(s.first_key.data() + r0), last = load(s.last_key.data() + r0);
      const Vec old_max = load(s.row_max.data() + r0);
      Vec new_max = old_max;
      for (int64_t j = 0; j < num_keys; ++j) {
        const int32_t key = static_cast<int32_t>(j0 + j);
        float* sj = scores + j * padded_rows + r0;
        Vec v = load(sj) * log2_scale;
        if (needs_mask) v = (key >= first) & (key <= last) ? v : splat(kNegInf);
        store(sj, v);
        new_max = max(new_max, v);
      }
      if (num_keys % 2) store(scores + num_keys * padded_rows + r0, splat(kNegInf));
      const Vec row_shift = new_max == kNegInf ? splat(0.f) : new_max;
      const Vec row_alpha = exp2_lanes(old_max - row_shift);
      Vec sum = load(s.row_sum.data() + r0) * row_alpha;
      for (int64_t p = 0; p < num_pairs; ++p) {
        const Vec p0 = exp2_lanes(load(scores + 2 * p * padded_rows + r0) - row_shift);
        const Vec p1 = exp2_lanes(load(scores + (2 * p + 1) * padded_rows + r0) - row_shift);
        const __m512i pairs = pack_bf16_pairs(p0, p1);
        _mm512_storeu_si512(probs + p * padded_rows + r0, pairs);
        sum += low_half(pairs) + high_half(pairs);
      }
      store(s.row_max.data() + r0, new_max);
      store(s.row_sum.data() + r0, sum);
      store(s.alpha.data() + r0, row_alpha);
    }

    float* acc = s.acc.data();
    const uint32_t* values = s.values.data();
    const float* alpha = s.alpha.data();
    for (r0 = 0; r0 + 2 * kLanes <= padded_rows; r0 += 2 * kLanes) {
      for (int64_t d = 0; d < dim; d += 8) {
        add_values_bf16<2, 8>(acc + d * padded_rows + r0, alpha + r0, probs + r0, values + d, num_pairs, padded_rows, dim);
      }
    }
    if (r0 < padded_rows) {
      for (int64_t d = 0; d < dim; d += 8) {
        add_values_bf16<1, 8>(acc + d * padded_rows + r0, alpha + r0, probs + r0, values + d, num_pairs, padded_rows, dim);
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const float inv_sum = 1.f / s.row_sum[r];
    const int64_t head = kv_head * group + r % group;
    c10::BFloat16* o = pb.out + ((token_begin + r / group) * pb.num_heads + head) * dim;
    const float* acc = s.acc.data() + r;
    for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<c10::BFloat16>(acc[d * padded_rows] * inv_sum);
  }
}
#endif  // __AVX512BF16__ && __AVX512BW__

// ---------------------------------------------------------------------------------------------
// Decode (one query per sequence), flash-decoding style. With one query a prefill item would
// have group rows of kLanes lanes, and one item per KV head is too few to keep every worker busy
// (3 items for 2 workers with SmolLM2). Here a unit of work is a split: a range of one sequence's
// keys, for all its heads, so a page row (every KV head of a token) is read contiguously and
// long sequences spread over all workers. Lanes run along head_dim (fastgen::cpu::vec, any
// dtype): a score is a dot product, reduced across lanes once per (key, head). A split leaves
// its unnormalised state (max, sum, acc) when the sequence has several; a merge combines them.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kMinSplitKeys = 256;  // shorter splits cost more in merging than they gain

struct DecodeSplit {
  int64_t seq;
  int64_t k_begin, k_end;  // keys [k_begin, k_end) of the sequence
  // Where the split's state goes, [num_heads, head_dim + 2] at `partial` * that size; none
  // when the split is the whole sequence and writes `out` itself.
  std::optional<int64_t> partial;
};

struct DecodeScratch {
  explicit DecodeScratch(int64_t num_heads, int64_t head_dim)
      : queries(num_heads * head_dim), keys(kKeyTile * head_dim), values(kKeyTile * head_dim),
        scores(kKeyTile), acc(num_heads * head_dim), row_max(num_heads), row_sum(num_heads) {}
  std::vector<float> queries;       // [num_heads, head_dim]: queries * scale * log2(e)
  std::vector<float> keys, values;  // [kKeyTile, head_dim]: one KV head's rows of the tile
  std::vector<float> scores;        // [kKeyTile]
  std::vector<float> acc;           // [num_heads, head_dim]: unnormalised output
  std::vector<float> row_max, row_sum;  // [num_heads], log2 domain
};

// Converts n elements to float32 (n a multiple of vec::kWidth, or a tail at the end).
template <typename T>
inline void to_float(float* __restrict__ out, const T* __restrict__ in, int64_t n) {
  int64_t i = 0;
  for (; i + vec::kWidth <= n; i += vec::kWidth) vec::store(out + i, vec::load(in + i));
  if (i < n) vec::store(out + i, vec::load(in + i, n - i), n - i);
}

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

// A split's end: out = acc / sum when it is the whole sequence, else its state for the merge.
template <typename T>
void finish_decode_split(const Problem<T>& pb, const DecodeSplit& split, const float* acc,
                         const float* row_max, const float* row_sum, float* partials) {
  const int64_t heads = pb.num_heads, dim = pb.head_dim;
  if (split.partial) {
    float* state = partials + *split.partial * heads * (dim + 2);
    for (int64_t h = 0; h < heads; ++h) {
      state[h * (dim + 2)] = row_max[h];
      state[h * (dim + 2) + 1] = row_sum[h];
      std::copy_n(acc + h * dim, dim, state + h * (dim + 2) + 2);
    }
    return;
  }
  const int64_t token = pb.cu_seqlens_q[split.seq];
  for (int64_t h = 0; h < heads; ++h) {
    T* o = pb.out + (token * heads + h) * dim;
    const float inv_sum = 1.f / row_sum[h];
    for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[h * dim + d] * inv_sum);
  }
}

// Asks for the whole cache rows (all KV heads, contiguous within a page) of keys [begin, end),
// key and value: decode reads every head of a row, and rows are scattered across pages.
template <typename T>
inline void prefetch_cache_rows(const Problem<T>& pb, const int32_t* block_table, int64_t begin,
                                int64_t end) {
  const int64_t row = pb.num_kv_heads * pb.head_dim;
  const int64_t row_bytes = row * static_cast<int64_t>(sizeof(T));
  for (int64_t j = begin; j < end; ++j) {
    const int64_t slot = pb.slot(block_table, j);
    const char* k = reinterpret_cast<const char*>(pb.key_cache + slot * row);
    const char* v = reinterpret_cast<const char*>(pb.value_cache + slot * row);
    for (int64_t byte = 0; byte < row_bytes; byte += 64) {
      __builtin_prefetch(k + byte);
      __builtin_prefetch(v + byte);
    }
  }
}

template <typename T>
void attend_decode_split(const Problem<T>& pb, const DecodeSplit& split, DecodeScratch& s,
                         float* partials) {
  const int64_t heads = pb.num_heads, kv_heads = pb.num_kv_heads, dim = pb.head_dim;
  const int64_t group = heads / kv_heads, token = pb.cu_seqlens_q[split.seq];
  for (int64_t h = 0; h < heads; ++h) {
    to_float(s.queries.data() + h * dim, pb.query + token * pb.query_stride + h * dim, dim);
    for (int64_t d = 0; d < dim; ++d) s.queries[h * dim + d] *= pb.scale * kLog2e;
  }
  std::fill_n(s.row_max.begin(), heads, kNegInf);
  std::fill_n(s.row_sum.begin(), heads, 0.f);
  std::fill_n(s.acc.begin(), heads * dim, 0.f);

  const int32_t* block_table = pb.block_tables + split.seq * pb.max_blocks_per_seq;
  int64_t slots[kKeyTile];
  for (int64_t j0 = split.k_begin; j0 < split.k_end; j0 += kKeyTile) {
    const int64_t num_keys = std::min(kKeyTile, split.k_end - j0);
    for (int64_t j = 0; j < num_keys; ++j) slots[j] = pb.slot(block_table, j0 + j);
    // The tile after next.
    prefetch_cache_rows(pb, block_table, j0 + 2 * kKeyTile, std::min(j0 + 3 * kKeyTile, split.k_end));
    for (int64_t kv_head = 0; kv_head < kv_heads; ++kv_head) {
      for (int64_t j = 0; j < num_keys; ++j) {
        const int64_t offset = (slots[j] * kv_heads + kv_head) * dim;
        to_float(s.keys.data() + j * dim, pb.key_cache + offset, dim);
        to_float(s.values.data() + j * dim, pb.value_cache + offset, dim);
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
        add_weighted_rows(s.acc.data() + h * dim, alpha, scores, s.values.data(), num_keys, dim);
      }
    }
  }

  finish_decode_split(pb, split, s.acc.data(), s.row_max.data(), s.row_sum.data(), partials);
}

#if defined(FASTGEN_ATTENTION_BF16_DOT)
// bf16 decode on AVX512-BF16 (head_dim a multiple of 32): Q.K^T as pair dot products straight
// from the cache rows, 16 keys' partial sums folded into one vector of 16 scores by a transpose-
// and-add tree (4 levels instead of 16 separate lane reductions); P.V as pair dot products over
// value rows packed in key pairs, the probabilities rounded to bf16 as in prefill.

// Index vectors for one fold level: inputs a, b each hold `sources` partial sums in segments of
// 16 / sources lanes; the output holds a's then b's sources in segments half as long, the low
// (high) index picking each segment's first (second) half.
inline __m512i fold_index(int sources, bool high) {
  alignas(64) int32_t index[kLanes];
  const int segment = kLanes / sources, half = segment / 2;
  for (int o = 0; o < kLanes; ++o) {
    const int source = o / half, lane = o % half + (high ? half : 0);
    index[o] = source < sources ? source * segment + lane : kLanes + (source - sources) * segment + lane;
  }
  return _mm512_load_si512(index);
}

// lane i of the result = the sum of v[i]'s lanes, for 16 vectors (v is overwritten).
inline __m512 sum_lanes_16(__m512* v) {
  static const __m512i lo[4] = {fold_index(1, false), fold_index(2, false), fold_index(4, false), fold_index(8, false)};
  static const __m512i hi[4] = {fold_index(1, true), fold_index(2, true), fold_index(4, true), fold_index(8, true)};
  for (int level = 0, n = kLanes / 2; n >= 1; ++level, n /= 2) {
    for (int i = 0; i < n; ++i) {
      v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], lo[level], v[2 * i + 1]),
                           _mm512_permutex2var_ps(v[2 * i], hi[level], v[2 * i + 1]));
    }
  }
  return v[0];
}

struct DecodeBf16Scratch {
  explicit DecodeBf16Scratch(int64_t num_heads, int64_t head_dim)
      : values(kPairsPerTile * head_dim), acc(num_heads * head_dim), row_max(num_heads), row_sum(num_heads) {}
  std::vector<uint32_t> values;  // [kKeyTile / 2, head_dim]: bf16 pairs (v[2i, d], v[2i + 1, d])
  std::vector<float> acc;        // [num_heads, head_dim]: unnormalised output
  std::vector<float> row_max, row_sum;  // [num_heads], log2 domain
};

// acc[d] = acc[d] * alpha + sum_i probs[i] . values[i, d] (bf16 pairs) for kChunks x 16 dims.
template <int kChunks>
inline void add_value_pairs(float* __restrict__ acc, float alpha, const uint32_t* __restrict__ probs,
                            const uint32_t* __restrict__ values, int64_t num_pairs, int64_t dim) {
  __m512 sum[kChunks];
  for (int c = 0; c < kChunks; ++c) sum[c] = _mm512_mul_ps(_mm512_loadu_ps(acc + c * kLanes), _mm512_set1_ps(alpha));
  for (int64_t p = 0; p < num_pairs; ++p) {
    const __m512bh w = as_bf16_pairs(_mm512_set1_epi32(static_cast<int>(probs[p])));
    for (int c = 0; c < kChunks; ++c) {
      sum[c] = _mm512_dpbf16_ps(sum[c], as_bf16_pairs(_mm512_loadu_si512(values + p * dim + c * kLanes)), w);
    }
  }
  for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(acc + c * kLanes, sum[c]);
}

void attend_decode_split_bf16(const Problem<c10::BFloat16>& pb, const DecodeSplit& split,
                              DecodeBf16Scratch& s, float* partials) {
  using bf16 = c10::BFloat16;
  const int64_t heads = pb.num_heads, kv_heads = pb.num_kv_heads, dim = pb.head_dim;
  const int64_t group = heads / kv_heads, token = pb.cu_seqlens_q[split.seq];
  std::fill_n(s.row_max.begin(), heads, kNegInf);
  std::fill_n(s.row_sum.begin(), heads, 0.f);
  std::fill_n(s.acc.begin(), heads * dim, 0.f);
  const Vec log2_scale = splat(pb.scale * kLog2e);

  const int32_t* block_table = pb.block_tables + split.seq * pb.max_blocks_per_seq;
  int64_t slots[kKeyTile];
  const bf16* key_rows[kKeyTile];
  alignas(64) float scores[kKeyTile];
  uint32_t prob_pairs[kPairsPerTile];  // bf16 pairs (p[2i], p[2i + 1])
  for (int64_t j0 = split.k_begin; j0 < split.k_end; j0 += kKeyTile) {
    const int64_t num_keys = std::min(kKeyTile, split.k_end - j0);
    const int64_t num_pairs = (num_keys + 1) / 2;
    for (int64_t j = 0; j < num_keys; ++j) slots[j] = pb.slot(block_table, j0 + j);
    prefetch_cache_rows(pb, block_table, j0 + 2 * kKeyTile, std::min(j0 + 3 * kKeyTile, split.k_end));
    for (int64_t kv_head = 0; kv_head < kv_heads; ++kv_head) {
      for (int64_t p = 0; p < num_pairs; ++p) {
        const bf16* v0 = pb.value_cache + (slots[2 * p] * kv_heads + kv_head) * dim;
        const bf16* v1 = 2 * p + 1 < num_keys ? pb.value_cache + (slots[2 * p + 1] * kv_heads + kv_head) * dim : nullptr;
        for (int64_t d = 0; d < dim; d += kLanes) {
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)));
          const __m512i hi = v1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + d)))
                                : _mm512_setzero_si512();
          _mm512_storeu_si512(s.values.data() + p * dim + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      }
      for (int64_t j = 0; j < num_keys; ++j) key_rows[j] = pb.key_cache + (slots[j] * kv_heads + kv_head) * dim;

      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        const bf16* q = pb.query + token * pb.query_stride + h * dim;
        for (int64_t jb = 0; jb < kKeyTile; jb += kLanes) {
          __m512 partial[kLanes];
          for (int64_t j = 0; j < kLanes; ++j) {
            __m512 sum = _mm512_setzero_ps();
            if (jb + j < num_keys) {
              for (int64_t d = 0; d < dim; d += 2 * kLanes) {
                sum = _mm512_dpbf16_ps(sum, as_bf16_pairs(_mm512_loadu_si512(q + d)),
                                       as_bf16_pairs(_mm512_loadu_si512(key_rows[jb + j] + d)));
              }
            }
            partial[j] = sum;
          }
          const IVec key = IVec{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + static_cast<int32_t>(jb);
          const Vec v = (Vec)sum_lanes_16(partial) * log2_scale;
          store(scores + jb, key < static_cast<int32_t>(num_keys) ? v : splat(kNegInf));
        }
        const Vec s0 = load(scores), s1 = load(scores + kLanes);
        const float tile_max = _mm512_reduce_max_ps(max(s0, s1));  // finite: the tile has a key
        const float new_max = std::max(s.row_max[h], tile_max);
        const float alpha = std::exp2(s.row_max[h] - new_max);
        const __m256bh p0 = _mm512_cvtneps_pbh(exp2_lanes(s0 - new_max));
        const __m256bh p1 = _mm512_cvtneps_pbh(exp2_lanes(s1 - new_max));
        std::memcpy(prob_pairs, &p0, sizeof(p0));
        std::memcpy(prob_pairs + kLanes / 2, &p1, sizeof(p1));
        const Vec rounded = (Vec)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(p0)), 16)) +
                            (Vec)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(p1)), 16));
        s.row_sum[h] = s.row_sum[h] * alpha + _mm512_reduce_add_ps(rounded);
        s.row_max[h] = new_max;

        float* acc = s.acc.data() + h * dim;
        int64_t d = 0;
        for (; d + 4 * kLanes <= dim; d += 4 * kLanes) {
          add_value_pairs<4>(acc + d, alpha, prob_pairs, s.values.data() + d, num_pairs, dim);
        }
        for (; d < dim; d += 2 * kLanes) add_value_pairs<2>(acc + d, alpha, prob_pairs, s.values.data() + d, num_pairs, dim);
      }
    }
  }
  finish_decode_split(pb, split, s.acc.data(), s.row_max.data(), s.row_sum.data(), partials);
}
#endif  // FASTGEN_ATTENTION_BF16_DOT

// out for one sequence from its splits' states [num_splits, num_heads, head_dim + 2]: each
// split's sum and acc scaled by 2^(its max - the overall max), added, then divided.
template <typename T>
void merge_decode_splits(const Problem<T>& pb, int64_t seq, const float* states, int64_t num_splits) {
  const int64_t heads = pb.num_heads, dim = pb.head_dim, stride = heads * (dim + 2);
  const int64_t token = pb.cu_seqlens_q[seq];
  std::vector<float> acc(dim);
  for (int64_t h = 0; h < heads; ++h) {
    float max = kNegInf;
    for (int64_t i = 0; i < num_splits; ++i) max = std::max(max, states[i * stride + h * (dim + 2)]);
    std::fill(acc.begin(), acc.end(), 0.f);
    float sum = 0.f;
    for (int64_t i = 0; i < num_splits; ++i) {
      const float* state = states + i * stride + h * (dim + 2);
      const float weight = std::exp2(state[0] - max);
      sum += weight * state[1];
      for (int64_t d = 0; d < dim; ++d) acc[d] += weight * state[2 + d];
    }
    T* o = pb.out + (token * heads + h) * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[d] / sum);
  }
}

// Runs fn(task, scratch) for every task in [0, num_tasks) on the thread pool. Workers take the
// next task from a shared counter, so one slowed down by another process takes fewer; each has
// its own scratch, made once.
template <typename MakeScratch, typename Fn>
void for_each_task(int64_t num_tasks, MakeScratch make_scratch, Fn fn) {
  if (num_tasks == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, num_workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t task = next++; task < num_tasks; task = next++) fn(task, scratch);
  });
}

// Sequences with one query, as splits of about the same number of keys: enough of them for
// ~4 tasks a worker when the keys allow (a sequence is cut only when that leaves >= kMinSplitKeys
// keys a split), and each sequence's run of partial states for the merge.
struct DecodePlan {
  std::vector<DecodeSplit> splits;
  struct Merge {
    int64_t seq, first_partial, num_splits;
  };
  std::vector<Merge> merges;
  int64_t num_partials = 0;
};

template <typename T>
DecodePlan plan_decode(const Problem<T>& pb, int64_t num_seqs) {
  auto visible_keys = [&](int64_t b) {  // [first, end) for sequence b's only query
    const int64_t pos = pb.seq_lens_k[b] - 1;
    return std::pair{std::max({int64_t{0}, pos - pb.window + 1, pos / pb.chunk * pb.chunk}), pos + 1};
  };
  int64_t total_keys = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    if (pb.cu_seqlens_q[b + 1] - pb.cu_seqlens_q[b] != 1) continue;
    const auto [first, end] = visible_keys(b);
    total_keys += end - first;
  }
  const int64_t target_tasks = 4 * at::get_num_threads();
  const int64_t split_keys = std::max(kMinSplitKeys, round_up((total_keys + target_tasks - 1) / target_tasks, kKeyTile));
  DecodePlan plan;
  for (int64_t b = 0; b < num_seqs; ++b) {
    if (pb.cu_seqlens_q[b + 1] - pb.cu_seqlens_q[b] != 1) continue;
    const auto [first, end] = visible_keys(b);
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

}  // namespace

template <typename T>
void attention_launch(T* out, const T* query, const T* key_cache, const T* value_cache,
                      const int32_t* cu_seqlens_q, const int32_t* seq_lens_k,
                      const int32_t* block_tables, int64_t num_seqs, int64_t num_heads,
                      int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                      int64_t max_blocks_per_seq, int64_t query_stride, float scale,
                      std::optional<int64_t> sliding_window, std::optional<int64_t> chunk_size) {
  constexpr int64_t kUnbounded = std::numeric_limits<int64_t>::max();
  const Problem<T> problem{out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k,
                           block_tables, num_heads, num_kv_heads, head_dim, block_size,
                           max_blocks_per_seq, query_stride, scale,
                           sliding_window.value_or(kUnbounded), chunk_size.value_or(kUnbounded)};

  const DecodePlan decode = plan_decode(problem, num_seqs);
  std::vector<float> partials(decode.num_partials * num_heads * (head_dim + 2));
  const int64_t num_splits = static_cast<int64_t>(decode.splits.size());
  bool decoded = false;
#if defined(FASTGEN_ATTENTION_BF16_DOT)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (head_dim % (2 * kLanes) == 0) {
      for_each_task(
          num_splits, [&] { return DecodeBf16Scratch(num_heads, head_dim); },
          [&](int64_t task, DecodeBf16Scratch& s) {
            attend_decode_split_bf16(problem, decode.splits[task], s, partials.data());
          });
      decoded = true;
    }
  }
#endif
  if (!decoded) {
    for_each_task(
        num_splits, [&] { return DecodeScratch(num_heads, head_dim); },
        [&](int64_t task, DecodeScratch& s) {
          attend_decode_split(problem, decode.splits[task], s, partials.data());
        });
  }
  for_each_task(
      static_cast<int64_t>(decode.merges.size()), [] { return 0; },
      [&](int64_t task, int) {
        const DecodePlan::Merge& m = decode.merges[task];
        merge_decode_splits(problem, m.seq, partials.data() + m.first_partial * num_heads * (head_dim + 2),
                            m.num_splits);
      });

  // Sequences with several queries: blocks of queries, the latest (which see the most keys)
  // first, so that the short ones at the end fill in the gaps.
  const int64_t group = num_heads / num_kv_heads;
  const int64_t queries_per_item = std::max<int64_t>(1, kRowsPerItem / group);
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = cu_seqlens_q[b + 1] - cu_seqlens_q[b];
    if (q_len <= 1) continue;
    for (int64_t q = 0; q < q_len; q += queries_per_item) {
      items.push_back({b, q, std::min(q + queries_per_item, q_len)});
    }
  }
  std::sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.q_end > b.q_end; });
  const int64_t num_tasks = static_cast<int64_t>(items.size()) * num_kv_heads;
  const int64_t max_rows = round_up(queries_per_item * group, kLanes);
#if defined(FASTGEN_ATTENTION_BF16_DOT)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (head_dim % kLanes == 0) {
      for_each_task(
          num_tasks, [&] { return Bf16Scratch(max_rows, head_dim); },
          [&](int64_t task, Bf16Scratch& s) {
            attend_item_bf16(problem, items[task / num_kv_heads], task % num_kv_heads, s);
          });
      return;
    }
  }
#endif
  for_each_task(
      num_tasks, [&] { return Scratch(max_rows, head_dim); },
      [&](int64_t task, Scratch& s) {
        attend_item(problem, items[task / num_kv_heads], task % num_kv_heads, s);
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

void attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
               const at::Tensor& value_cache, const at::Tensor& cu_seqlens_q,
               const at::Tensor& seq_lens_k, const at::Tensor& block_tables, int64_t max_seqlen_q,
               int64_t max_seqlen_k, double scale, std::optional<int64_t> sliding_window,
               std::optional<int64_t> chunk_size) {
  constexpr const char* op = "attention";
  check_attention_args(out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k, block_tables,
                       sliding_window, chunk_size);
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

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
