// bf16 decode attention on AVX512-BF16 (head_dim a multiple of 32): decode.cpp's splits, with
// Q.K^T as pair dot products straight from the cache rows, 16 keys' partial sums folded into one
// vector of 16 scores by a transpose-and-add tree (4 levels instead of 16 separate lane
// reductions), and P.V as pair dot products over value rows packed in key pairs, the
// probabilities rounded to bf16 as in prefill_bf16.cpp.
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

struct Scratch {
  explicit Scratch(int64_t num_heads, int64_t head_dim)
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
    const __m512bh w = vec::as_bf16_pairs(_mm512_set1_epi32(static_cast<int>(probs[p])));
    for (int c = 0; c < kChunks; ++c) {
      sum[c] = _mm512_dpbf16_ps(sum[c], vec::as_bf16_pairs(_mm512_loadu_si512(values + p * dim + c * kLanes)), w);
    }
  }
  for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(acc + c * kLanes, sum[c]);
}

void attend_split(const Problem<c10::BFloat16>& pb, const DecodeSplit& split, Scratch& s, SplitStates states) {
  using bf16 = c10::BFloat16;
  const int64_t heads = pb.num_heads, kv_heads = pb.num_kv_heads, dim = pb.head_dim;
  const int64_t group = pb.group(), token = pb.cu_seqlens_q[split.seq];
  std::fill_n(s.row_max.begin(), heads, kNegInf);
  std::fill_n(s.row_sum.begin(), heads, 0.f);
  std::fill_n(s.acc.begin(), heads * dim, 0.f);
  const vec::Vec log2_scale = vec::set1(pb.scale * kLog2e);

  const int32_t* block_table = pb.block_table(split.seq);
  int64_t slots[kKeyTile];
  const bf16* key_rows[kKeyTile];
  const bf16* value_rows[kKeyTile];
  alignas(64) float scores[kKeyTile];
  uint32_t prob_pairs[kPairsPerTile];  // bf16 pairs (p[2i], p[2i + 1])
  for (int64_t j0 = split.k_begin; j0 < split.k_end; j0 += kKeyTile) {
    const int64_t num_keys = std::min(kKeyTile, split.k_end - j0);
    const int64_t num_pairs = (num_keys + 1) / 2;
    for (int64_t j = 0; j < num_keys; ++j) slots[j] = pb.slot(block_table, j0 + j);
    for (int64_t kv_head = 0; kv_head < kv_heads; ++kv_head) {
      for (int64_t j = 0; j < num_keys; ++j) {
        const int64_t row = pb.cache_row(slots[j], kv_head);
        key_rows[j] = pb.key_cache + row;
        value_rows[j] = pb.value_cache + row;
      }
      pack_value_pairs(s.values.data(), value_rows, num_keys, dim);

      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        const bf16* q = pb.query_row(token, h);
        for (int64_t jb = 0; jb < kKeyTile; jb += kLanes) {
          __m512 partial[kLanes];
          // kKeysAtOnce keys per pass over d: independent FMA chains (one chain is bound by the
          // dot-product latency, which a 576-wide MLA row makes 18 deep) sharing each query load.
          // Each key's sum still runs over d in order, so the scores are unchanged.
          for (int64_t j = 0; j < kLanes; j += kKeysAtOnce) {
            __m512 sum[kKeysAtOnce];
            const bf16* rows[kKeysAtOnce];
            for (int64_t i = 0; i < kKeysAtOnce; ++i) {
              sum[i] = _mm512_setzero_ps();
              // a key past the tile's end reads a valid row (the first) and is masked below
              rows[i] = key_rows[jb + j + i < num_keys ? jb + j + i : 0];
            }
            for (int64_t d = 0; d < dim; d += 2 * kLanes) {
              const __m512bh qv = vec::as_bf16_pairs(_mm512_loadu_si512(q + d));
              for (int64_t i = 0; i < kKeysAtOnce; ++i) {
                sum[i] = _mm512_dpbf16_ps(sum[i], qv, vec::as_bf16_pairs(_mm512_loadu_si512(rows[i] + d)));
              }
            }
            for (int64_t i = 0; i < kKeysAtOnce; ++i) partial[j + i] = sum[i];
          }
          const vec::Mask in_tile = vec::iota(static_cast<int32_t>(jb)) < vec::set1_int(static_cast<int32_t>(num_keys));
          const vec::Vec v = vec::Vec{sum_lanes_16(partial)} * log2_scale;
          vec::store(scores + jb, vec::select(in_tile, v, vec::set1(kNegInf)));
        }
        const vec::Vec s0 = vec::load(scores), s1 = vec::load(scores + kLanes);
        const float tile_max = vec::reduce_max(vec::max(s0, s1));  // finite: the tile has a key
        const float new_max = std::max(s.row_max[h], tile_max);
        const float alpha = std::exp2(s.row_max[h] - new_max);
        const __m256bh p0 = vec::round_to_bf16(vec::exp2(s0 - vec::set1(new_max)));
        const __m256bh p1 = vec::round_to_bf16(vec::exp2(s1 - vec::set1(new_max)));
        std::memcpy(prob_pairs, &p0, sizeof(p0));
        std::memcpy(prob_pairs + kLanes / 2, &p1, sizeof(p1));
        const vec::Vec rounded = vec::to_float(p0) + vec::to_float(p1);
        s.row_sum[h] = s.row_sum[h] * alpha + vec::reduce_add(rounded);
        s.row_max[h] = new_max;

        float* acc = s.acc.data() + h * dim;
        int64_t d = 0;
        for (; d + 8 * kLanes <= dim; d += 8 * kLanes) {  // 8 independent chains where they fit
          add_value_pairs<8>(acc + d, alpha, prob_pairs, s.values.data() + d, num_pairs, dim);
        }
        for (; d + 4 * kLanes <= dim; d += 4 * kLanes) {
          add_value_pairs<4>(acc + d, alpha, prob_pairs, s.values.data() + d, num_pairs, dim);
        }
        for (; d < dim; d += 2 * kLanes) add_value_pairs<2>(acc + d, alpha, prob_pairs, s.values.data() + d, num_pairs, dim);
      }
    }
  }
  finish_decode_split(pb, split, s.acc.data(), s.row_max.data(), s.row_sum.data(), states);
}

}  // namespace

void decode_bf16(const Problem<c10::BFloat16>& problem, const DecodePlan& plan, SplitStates states) {
  for_each_task(
      static_cast<int64_t>(plan.splits.size()), [&] { return Scratch(problem.num_heads, problem.head_dim); },
      [&](int64_t task, Scratch& s) { attend_split(problem, plan.splits[task], s, states); });
}

}  // namespace fastgen::cpu::attention_kernels

FASTGEN_INTRINSICS_END

#endif  // FASTGEN_VEC_AVX512_BF16
