// bf16 decode attention on AVX512-BF16 (head and value sizes multiples of 32): decode.cpp's
// splits, with Q.K^T as pair dot products straight from the cache rows and P.V as pair dot
// products over value rows packed in key pairs, the probabilities rounded to bf16 as in
// prefill_bf16.cpp. The query heads of a KV head go through both in tiles of up to 4, so each
// cache load feeds 4 heads' FMAs: what makes grouped-query attention, and MLA's one latent KV
// head for all query heads, compute-bound rather than load-bound. A pass scores 4 heads x 4 keys
// and folds their 16 partial-sum vectors into one vector of scores by a transpose-and-add tree
// (4 levels instead of 16 separate lane reductions).
// Builds without AVX512-BF16 compile this file to nothing (the dispatcher never calls it there).
#include "cpu/vec.h"

#if defined(FASTGEN_VEC_AVX512_BF16)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <c10/util/BFloat16.h>

#include "cpu/attention/problem.h"
#include "cpu/attention/tile.h"

FASTGEN_INTRINSICS_BEGIN

namespace fastgen::cpu::attention_kernels {

namespace {

static_assert(kLanes == 16, "the bf16 kernels are written for 16-lane AVX-512 vectors");

constexpr int64_t kKeysAtOnce = 4;  // keys whose scores are summed side by side
static_assert(kLanes % kKeysAtOnce == 0);

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

constexpr int kHeadTile = 4;  // query heads of one KV head scored and weighted together

struct Scratch {
  explicit Scratch(int64_t num_heads, int64_t value_dim)
      : values(kPairsPerTile * value_dim), acc(num_heads * value_dim), row_max(num_heads), row_sum(num_heads) {}
  std::vector<uint32_t> values;  // [kKeyTile / 2, value_dim]: bf16 pairs (v[2i, d], v[2i + 1, d])
  std::vector<float> acc;        // [num_heads, value_dim]: unnormalised output
  std::vector<float> row_max, row_sum;  // [num_heads], log2 domain
  alignas(64) float scores[kHeadTile][kKeyTile];
  uint32_t probs[kHeadTile][kPairsPerTile];  // bf16 pairs (p[2i], p[2i + 1]) per head
  float alpha[kHeadTile];
};

// partial[h * kKeysAtOnce + i] = the lane-wise partial sums of q[h] . rows[i] for kHeads heads and
// kKeysAtOnce keys: kHeads x kKeysAtOnce independent FMA chains (one chain is bound by the
// dot-product latency, which a 576-wide MLA row makes 18 deep), each key load shared by the heads
// and each query load by the keys. The slots past kHeads are zeros. Each key's sum runs over d in
// order, whatever the tile, so the scores do not depend on it.
template <int kHeads>
inline void score_keys(__m512* partial, const c10::BFloat16* const* q, const c10::BFloat16* const* rows, int64_t dim) {
  __m512 sum[kHeads][kKeysAtOnce];
  for (int h = 0; h < kHeads; ++h)
    for (int i = 0; i < kKeysAtOnce; ++i) sum[h][i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 2 * kLanes) {
    __m512bh k[kKeysAtOnce];
    for (int i = 0; i < kKeysAtOnce; ++i) k[i] = vec::as_bf16_pairs(_mm512_loadu_si512(rows[i] + d));
    for (int h = 0; h < kHeads; ++h) {
      const __m512bh qv = vec::as_bf16_pairs(_mm512_loadu_si512(q[h] + d));
      for (int i = 0; i < kKeysAtOnce; ++i) sum[h][i] = _mm512_dpbf16_ps(sum[h][i], qv, k[i]);
    }
  }
  for (int h = 0; h < kHeadTile; ++h)
    for (int i = 0; i < kKeysAtOnce; ++i) partial[h * kKeysAtOnce + i] = h < kHeads ? sum[h][i] : _mm512_setzero_ps();
}

// acc[h][d] = acc[h][d] * alpha[h] + sum_i probs[h][i] . values[i, d] (bf16 pairs) for kHeads
// heads (acc rows acc_stride apart) and kChunks x 16 dims: each value load shared by the heads.
template <int kHeads, int kChunks>
inline void add_value_pairs(float* __restrict__ acc, int64_t acc_stride, const float* alpha,
                            const uint32_t (*probs)[kPairsPerTile], const uint32_t* __restrict__ values,
                            int64_t num_pairs, int64_t dim) {
  __m512 sum[kHeads][kChunks];
  for (int h = 0; h < kHeads; ++h) {
    const __m512 a = _mm512_set1_ps(alpha[h]);
    for (int c = 0; c < kChunks; ++c) sum[h][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + h * acc_stride + c * kLanes), a);
  }
  for (int64_t p = 0; p < num_pairs; ++p) {
    __m512bh v[kChunks];
    for (int c = 0; c < kChunks; ++c) v[c] = vec::as_bf16_pairs(_mm512_loadu_si512(values + p * dim + c * kLanes));
    for (int h = 0; h < kHeads; ++h) {
      const __m512bh w = vec::as_bf16_pairs(_mm512_set1_epi32(static_cast<int>(probs[h][p])));
      for (int c = 0; c < kChunks; ++c) sum[h][c] = _mm512_dpbf16_ps(sum[h][c], v[c], w);
    }
  }
  for (int h = 0; h < kHeads; ++h)
    for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(acc + h * acc_stride + c * kLanes, sum[h][c]);
}

// One key tile for query heads [first_head, first_head + kHeads) of one KV head: scores, the
// online-softmax step, and P.V over the tile's packed values.
template <int kHeads>
void attend_heads(const Problem<c10::BFloat16>& pb, Scratch& s, int64_t token, int64_t first_head,
                  const c10::BFloat16* const* key_rows, int64_t num_keys) {
  static_assert(kHeadTile * kKeysAtOnce == kLanes, "one fold gives every (head, key) of a pass");
  const int64_t dim = pb.head_dim, vdim = pb.value_dim;
  const c10::BFloat16* q[kHeads];
  for (int h = 0; h < kHeads; ++h) q[h] = pb.query_row(token, first_head + h);
  // lane h * kKeysAtOnce + i of a fold is key i of the pass: masked past the tile's end
  const __m512i lane_key = _mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  static_assert(kKeysAtOnce == 4, "lane_key");
  const vec::Vec log2_scale = vec::set1(pb.scale * kLog2e);
  for (int64_t j = 0; j < kKeyTile; j += kKeysAtOnce) {
    const c10::BFloat16* rows[kKeysAtOnce];
    // a key past the tile's end reads a valid row (the first) and is masked below
    for (int64_t i = 0; i < kKeysAtOnce; ++i) rows[i] = key_rows[j + i < num_keys ? j + i : 0];
    __m512 partial[kLanes];
    score_keys<kHeads>(partial, q, rows, dim);
    const vec::Mask in_tile{_mm512_cmplt_epi32_mask(_mm512_add_epi32(lane_key, _mm512_set1_epi32(static_cast<int32_t>(j))),
                                                    _mm512_set1_epi32(static_cast<int32_t>(num_keys)))};
    alignas(64) float folded[kLanes];
    vec::store(folded, vec::select(in_tile, vec::Vec{sum_lanes_16(partial)} * log2_scale, vec::set1(kNegInf)));
    for (int h = 0; h < kHeads; ++h) std::memcpy(&s.scores[h][j], folded + h * kKeysAtOnce, sizeof(float) * kKeysAtOnce);
  }
  for (int h = 0; h < kHeads; ++h) {
    const int64_t head = first_head + h;
    const vec::Vec s0 = vec::load(s.scores[h]), s1 = vec::load(s.scores[h] + kLanes);
    const float tile_max = vec::reduce_max(vec::max(s0, s1));  // finite: the tile has a key
    const float new_max = std::max(s.row_max[head], tile_max);
    s.alpha[h] = std::exp2(s.row_max[head] - new_max);
    const __m256bh p0 = vec::round_to_bf16(vec::exp2(s0 - vec::set1(new_max)));
    const __m256bh p1 = vec::round_to_bf16(vec::exp2(s1 - vec::set1(new_max)));
    std::memcpy(s.probs[h], &p0, sizeof(p0));
    std::memcpy(s.probs[h] + kLanes / 2, &p1, sizeof(p1));
    const vec::Vec rounded = vec::to_float(p0) + vec::to_float(p1);
    s.row_sum[head] = s.row_sum[head] * s.alpha[h] + vec::reduce_add(rounded);
    s.row_max[head] = new_max;
  }
  const int64_t num_pairs = (num_keys + 1) / 2;
  float* acc = s.acc.data() + first_head * vdim;
  int64_t d = 0;
  for (; d + 4 * kLanes <= vdim; d += 4 * kLanes) {
    add_value_pairs<kHeads, 4>(acc + d, vdim, s.alpha, s.probs, s.values.data() + d, num_pairs, vdim);
  }
  for (; d < vdim; d += 2 * kLanes) {
    add_value_pairs<kHeads, 2>(acc + d, vdim, s.alpha, s.probs, s.values.data() + d, num_pairs, vdim);
  }
}

void attend_split(const Problem<c10::BFloat16>& pb, const DecodeSplit& split, Scratch& s, SplitStates states) {
  using bf16 = c10::BFloat16;
  const int64_t heads = pb.num_heads, kv_heads = pb.num_kv_heads, vdim = pb.value_dim;
  const int64_t group = pb.group(), token = pb.cu_seqlens_q[split.seq];
  std::fill_n(s.row_max.begin(), heads, kNegInf);
  std::fill_n(s.row_sum.begin(), heads, 0.f);
  std::fill_n(s.acc.begin(), heads * vdim, 0.f);

  const int32_t* block_table = pb.block_table(split.seq);
  int64_t slots[kKeyTile];
  const bf16* key_rows[kKeyTile];
  const bf16* value_rows[kKeyTile];
  for (int64_t j0 = split.k_begin; j0 < split.k_end; j0 += kKeyTile) {
    const int64_t num_keys = std::min(kKeyTile, split.k_end - j0);
    const int64_t ahead = j0 + kPrefetchTiles * kKeyTile;
    prefetch_page_rows(pb, block_table, ahead, std::min(ahead + kKeyTile, split.k_end));
    for (int64_t j = 0; j < num_keys; ++j) slots[j] = pb.slot(block_table, j0 + j);
    for (int64_t kv_head = 0; kv_head < kv_heads; ++kv_head) {
      for (int64_t j = 0; j < num_keys; ++j) {
        const int64_t row = pb.cache_row(slots[j], kv_head);
        key_rows[j] = pb.key_cache + row;
        value_rows[j] = pb.value_cache + row;
      }
      pack_value_pairs(s.values.data(), value_rows, num_keys, vdim);
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; h += kHeadTile) {
        switch (std::min<int64_t>(kHeadTile, (kv_head + 1) * group - h)) {
          case 4: attend_heads<4>(pb, s, token, h, key_rows, num_keys); break;
          case 3: attend_heads<3>(pb, s, token, h, key_rows, num_keys); break;
          case 2: attend_heads<2>(pb, s, token, h, key_rows, num_keys); break;
          default: attend_heads<1>(pb, s, token, h, key_rows, num_keys); break;
        }
      }
    }
  }
  finish_decode_split(pb, split, s.acc.data(), s.row_max.data(), s.row_sum.data(), states);
}

}  // namespace

void decode_bf16(const Problem<c10::BFloat16>& problem, const DecodePlan& plan, SplitStates states) {
  for_each_task(
      static_cast<int64_t>(plan.splits.size()), [&] { return Scratch(problem.num_heads, problem.value_dim); },
      [&](int64_t task, Scratch& s) { attend_split(problem, plan.splits[task], s, states); },
      [&](int64_t task) { prefetch_split_start(problem, plan.splits[task]); });
}

}  // namespace fastgen::cpu::attention_kernels

FASTGEN_INTRINSICS_END

#endif  // FASTGEN_VEC_AVX512_BF16
