// bf16 prefill attention on AVX512-BF16 (head_dim a multiple of 16): prefill.cpp's work items,
// rows and online softmax, with both products as VDPBF16PS, which multiplies pairs of bf16 and
// adds both products to a float32 lane (32 multiply-adds an instruction, twice the float32 FMA).
//
// Rows stay the lanes. Q.K^T pairs along head_dim: queries are packed once per item as
// [head_dim / 2, rows] 32-bit pairs, and a key row's consecutive bf16 already are such pairs, so
// each is broadcast straight from the tile's copy. P.V pairs along keys: probabilities are
// rounded to bf16 (what flash-attention does on GPUs) and packed [kKeyTile / 2, rows], values
// once per tile [kKeyTile / 2, head_dim]. Rounding P to bf16 is a relative error of 2^-9 on each
// weight; the row sums add the rounded weights, so the output stays a weighted mean of values.
// With AMX-BF16 (head_dim a multiple of 32, value_dim of 16), both products are TDPBF16PS on the
// same operands instead: Q.K^T as K (the tile's key rows, 16 keys x 32 dims) times the packed
// queries (16 pairs x 16 rows), which lands in scores[key, row] as is; P.V as V^T (16 dims x 32
// keys, transposed once per tile) times the packed probabilities (16 pairs x 16 rows), added into
// acc[dim, row] after its rescale. The softmax between them is the same code.
// Builds without AVX512-BF16 compile this file to nothing (the dispatcher never calls it there).
#include "cpu/vec.h"

#if defined(FASTGEN_VEC_AVX512_BF16)
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <c10/util/BFloat16.h>

#include "cpu/amx.h"
#include "cpu/attention/problem.h"
#include "cpu/attention/tile.h"

#define FASTGEN_AMX_BF16 __attribute__((target("amx-tile,amx-bf16")))

FASTGEN_INTRINSICS_BEGIN

namespace fastgen::cpu::attention_kernels {

namespace {

static_assert(kLanes == 16, "the bf16 kernels are written for 16-lane AVX-512 vectors");

// A worker's AMX tile state: every tile 16 rows x 64 bytes, configured for its life.
class Tiles {
 public:
  explicit Tiles(bool amx) : amx_(amx) {
    if (amx_) configure();
  }
  ~Tiles() {
    if (amx_) release();
  }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;

 private:
  FASTGEN_AMX_BF16 static void configure() {
    const TileConfig config(16, 64);
    FASTGEN_LOAD_TILE_CONFIG(config);
  }
  FASTGEN_AMX_BF16 static void release() { _tile_release(); }
  bool amx_;
};

struct Scratch {
  explicit Scratch(int64_t max_rows, int64_t head_dim, int64_t value_dim, bool amx)
      : queries(head_dim / 2 * max_rows), keys(kKeyTile * head_dim / 2),
        values(kPairsPerTile * value_dim), scores(kKeyTile * max_rows),
        probs(kPairsPerTile * max_rows), acc(value_dim * max_rows), row_max(max_rows),
        row_sum(max_rows), alpha(max_rows), first_key(max_rows), last_key(max_rows),
        values_t(amx ? value_dim * kKeyTile : 0), product(amx ? value_dim * max_rows : 0),
        tiles(amx) {}
  std::vector<uint32_t> queries;  // [head_dim / 2, rows]: bf16 pairs (q[r, 2i], q[r, 2i + 1])
  std::vector<uint32_t> keys;     // [kKeyTile, head_dim / 2]: the tile's key rows, zero past it
  std::vector<uint32_t> values;   // [kKeyTile / 2, value_dim]: bf16 pairs (v[2i, d], v[2i + 1, d])
  std::vector<float> scores;      // [kKeyTile, rows]: log2-domain scores
  std::vector<uint32_t> probs;    // [kKeyTile / 2, rows]: bf16 pairs (p[r, 2i], p[r, 2i + 1])
  std::vector<float> acc;         // [value_dim, rows]: unnormalised output, transposed
  std::vector<float> row_max, row_sum, alpha;  // [rows]
  std::vector<int32_t> first_key, last_key;    // [rows]: visible keys, inclusive
  std::vector<uint16_t> values_t;  // AMX: [value_dim, kKeyTile] bf16, the tile's values transposed
  std::vector<float> product;      // AMX: [value_dim, rows], the tile's P.V
  Tiles tiles;
};

// out[c * out_stride + r] = in[r * in_stride + c] for a 16 x 16 block of 32-bit elements.
inline void transpose16(const uint32_t* in, int64_t in_stride, uint32_t* out, int64_t out_stride) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(in + i * in_stride);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + i * out_stride, r[i]);
}

// AMX: scores[j, r] = q[r] . k[j] for the tile's kKeyTile keys (keys past num_keys are zero rows)
// and the item's padded rows.
FASTGEN_AMX_BF16 void dot_keys_amx(float* scores, const uint32_t* queries, const uint32_t* keys,
                                   int64_t num_keys, int64_t padded, int64_t half_dim) {
  for (int64_t r0 = 0; r0 < padded; r0 += kLanes) {
    for (int64_t j = 0; j < num_keys; j += 16) {
      _tile_zero(2);
      for (int64_t p = 0; p < half_dim; p += 16) {  // 32 dims a step
        _tile_loadd(0, keys + j * half_dim + p, half_dim * 4);
        _tile_loadd(1, queries + p * padded + r0, padded * 4);
        _tile_dpbf16ps(2, 0, 1);
      }
      _tile_stored(2, scores + j * padded + r0, padded * 4);
    }
  }
}

// AMX: product[d, r] = sum_j p[r, j] v[j, d] over the tile (probs zero past its keys, values_t
// zero past them too).
FASTGEN_AMX_BF16 void add_values_amx(float* product, const uint32_t* probs,
                                     const uint16_t* values_t, int64_t padded, int64_t vdim) {
  for (int64_t r0 = 0; r0 < padded; r0 += kLanes) {
    _tile_loadd(4, probs + r0, padded * 4);  // kPairsPerTile = 16 pairs of keys
    for (int64_t d = 0; d < vdim; d += 16) {
      _tile_zero(5);
      _tile_loadd(3, values_t + d * kKeyTile, kKeyTile * 2);
      _tile_dpbf16ps(5, 3, 4);
      _tile_stored(5, product + d * padded + r0, padded * 4);
    }
  }
}

static_assert(kKeyTile == 32 && kPairsPerTile == 16, "the AMX tiles hold 32 keys, 16 key pairs");

// scores[j, r] = sum_d q[r, d] k[j, d] for kKeys keys and kBlocks x 16 rows: kBlocks x kKeys
// independent accumulators; each query load is used kKeys times, each key broadcast kBlocks times.
template <int kBlocks, int kKeys>
inline void dot_keys(float* __restrict__ scores, const uint32_t* __restrict__ queries,
                     const uint32_t* __restrict__ keys, int64_t rows, int64_t half_dim) {
  __m512 sum[kBlocks][kKeys];
  for (int b = 0; b < kBlocks; ++b)
    for (int i = 0; i < kKeys; ++i) sum[b][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < half_dim; ++p) {
    __m512bh q[kBlocks];
    for (int b = 0; b < kBlocks; ++b) q[b] = vec::as_bf16_pairs(_mm512_loadu_si512(queries + p * rows + b * kLanes));
    for (int i = 0; i < kKeys; ++i) {
      const __m512bh k = vec::as_bf16_pairs(_mm512_set1_epi32(static_cast<int>(keys[i * half_dim + p])));
      for (int b = 0; b < kBlocks; ++b) sum[b][i] = _mm512_dpbf16_ps(sum[b][i], q[b], k);
    }
  }
  for (int b = 0; b < kBlocks; ++b)
    for (int i = 0; i < kKeys; ++i) _mm512_storeu_ps(scores + i * rows + b * kLanes, sum[b][i]);
}

// acc[d, r] = acc[d, r] * alpha[r] + sum_j p[r, j] v[j, d] for kDims dims and kBlocks x 16 rows.
template <int kBlocks, int kDims>
inline void add_values(float* __restrict__ acc, const float* __restrict__ alpha,
                       const uint32_t* __restrict__ probs, const uint32_t* __restrict__ values,
                       int64_t num_pairs, int64_t rows, int64_t dim) {
  __m512 sum[kBlocks][kDims];
  for (int b = 0; b < kBlocks; ++b) {
    const __m512 a = _mm512_loadu_ps(alpha + b * kLanes);
    for (int i = 0; i < kDims; ++i) sum[b][i] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * rows + b * kLanes), a);
  }
  for (int64_t p = 0; p < num_pairs; ++p) {
    __m512bh w[kBlocks];
    for (int b = 0; b < kBlocks; ++b) w[b] = vec::as_bf16_pairs(_mm512_loadu_si512(probs + p * rows + b * kLanes));
    for (int i = 0; i < kDims; ++i) {
      const __m512bh v = vec::as_bf16_pairs(_mm512_set1_epi32(static_cast<int>(values[p * dim + i])));
      for (int b = 0; b < kBlocks; ++b) sum[b][i] = _mm512_dpbf16_ps(sum[b][i], w[b], v);
    }
  }
  for (int b = 0; b < kBlocks; ++b)
    for (int i = 0; i < kDims; ++i) _mm512_storeu_ps(acc + i * rows + b * kLanes, sum[b][i]);
}

// Tiles of 8 keys (scores) and 8 dims (values): kBlocks x 8 accumulators stay in registers.
constexpr int kTileKeys = 8, kTileDims = 8;

template <bool kAmx>
void attend_item(const Problem<c10::BFloat16>& pb, const WorkItem& item, int64_t kv_head, Scratch& s) {
  const int64_t dim = pb.head_dim, half_dim = dim / 2, vdim = pb.value_dim;
  const ItemRows rows = item_rows(pb, item, kv_head, s.first_key.data(), s.last_key.data());
  const int64_t padded = rows.padded;
  uint32_t* queries = s.queries.data();
  for (int64_t r = 0; r < rows.count; ++r) {
    const c10::BFloat16* q = pb.query_row(rows.token(r), rows.head(r));
    for (int64_t p = 0; p < half_dim; ++p) std::memcpy(queries + p * padded + r, q + 2 * p, 4);
  }
  for (int64_t r = rows.count; r < padded; ++r) {  // padding rows: zero queries
    for (int64_t p = 0; p < half_dim; ++p) queries[p * padded + r] = 0;
  }
  std::fill_n(s.row_max.begin(), padded, kNegInf);
  std::fill_n(s.row_sum.begin(), padded, 0.f);
  std::fill_n(s.acc.begin(), vdim * padded, 0.f);

  const int64_t keys_begin = s.first_key[0], keys_end = s.last_key[rows.count - 1] + 1;
  // Every row sees keys [latest_first, earliest_last]; tiles inside need no mask.
  const int64_t latest_first = s.first_key[rows.count - 1], earliest_last = s.last_key[0];
  const int32_t* block_table = pb.block_table(item.seq);
  const vec::Vec log2_scale = vec::set1(pb.scale * kLog2e);
  for (int64_t j0 = keys_begin; j0 < keys_end; j0 += kKeyTile) {
    const int64_t num_keys = std::min(kKeyTile, keys_end - j0);
    const int64_t num_pairs = (num_keys + 1) / 2;

    // Copy the tile's key rows, pack its value rows in pairs, prefetch the next tile's rows.
    const c10::BFloat16* value_rows[kKeyTile];
    for (int64_t j = 0; j < num_keys; ++j) {
      const int64_t row = pb.cache_row(pb.slot(block_table, j0 + j), kv_head);
      std::memcpy(s.keys.data() + j * half_dim, pb.key_cache + row, dim * 2);
      value_rows[j] = pb.value_cache + row;
    }
    prefetch_head_rows(pb, block_table, j0 + kKeyTile, std::min(j0 + 2 * kKeyTile, keys_end), kv_head);
    const int64_t scored_keys = kAmx ? kKeyTile : round_up(num_keys, kTileKeys);
    std::fill(s.keys.begin() + num_keys * half_dim, s.keys.begin() + scored_keys * half_dim, 0u);
    pack_value_pairs(s.values.data(), value_rows, num_keys, vdim);
    if constexpr (kAmx) {  // V^T: the pairs [16, vdim] transposed, 16 x 16 at a time
      std::fill(s.values.begin() + num_pairs * vdim, s.values.begin() + kPairsPerTile * vdim, 0u);
      uint32_t* vt = reinterpret_cast<uint32_t*>(s.values_t.data());
      for (int64_t d = 0; d < vdim; d += kLanes) {
        transpose16(s.values.data() + d, vdim, vt + d * kPairsPerTile, kPairsPerTile);
      }
    }

    float* scores = s.scores.data();
    const uint32_t* keys = s.keys.data();
    int64_t r0 = 0;
    if constexpr (kAmx) {
      dot_keys_amx(scores, queries, keys, num_keys, padded, half_dim);
    } else {
      for (; r0 + 2 * kLanes <= padded; r0 += 2 * kLanes) {
        for (int64_t j = 0; j < scored_keys; j += kTileKeys) {
          dot_keys<2, kTileKeys>(scores + j * padded + r0, queries + r0, keys + j * half_dim, padded, half_dim);
        }
      }
      if (r0 < padded) {
        for (int64_t j = 0; j < scored_keys; j += kTileKeys) {
          dot_keys<1, kTileKeys>(scores + j * padded + r0, queries + r0, keys + j * half_dim, padded, half_dim);
        }
      }
    }

    // Scale, mask (only tiles that reach past some row's visible keys), online softmax; the
    // probabilities leave as bf16 pairs, and the sums add exactly those rounded values.
    const bool needs_mask = j0 < latest_first || j0 + num_keys - 1 > earliest_last;
    uint32_t* probs = s.probs.data();
    for (r0 = 0; r0 < padded; r0 += kLanes) {
      const vec::IVec first = vec::load(s.first_key.data() + r0), last = vec::load(s.last_key.data() + r0);
      online_softmax_update(
          s.row_max.data() + r0, s.row_sum.data() + r0, s.alpha.data() + r0, num_keys,
          [&](int64_t j) {
            float* sj = scores + j * padded + r0;
            vec::Vec v = vec::load(sj) * log2_scale;
            if (needs_mask) v = vec::select(sees_key(first, last, j0 + j), v, vec::set1(kNegInf));
            vec::store(sj, v);
            return v;
          },
          [&](vec::Vec shift, vec::Vec sum) {
            if (num_keys % 2) vec::store(scores + num_keys * padded + r0, vec::set1(kNegInf));
            for (int64_t p = 0; p < num_pairs; ++p) {
              const vec::Vec p0 = vec::exp2(vec::load(scores + 2 * p * padded + r0) - shift);
              const vec::Vec p1 = vec::exp2(vec::load(scores + (2 * p + 1) * padded + r0) - shift);
              const __m512i pairs = vec::pack_bf16_pairs(p0, p1);
              _mm512_storeu_si512(probs + p * padded + r0, pairs);
              sum = sum + (vec::low_half(pairs) + vec::high_half(pairs));
            }
            return sum;
          });
    }

    float* acc = s.acc.data();
    const uint32_t* values = s.values.data();
    const float* alpha = s.alpha.data();
    if constexpr (kAmx) {
      std::fill(probs + num_pairs * padded, probs + kPairsPerTile * padded, 0u);
      float* product = s.product.data();
      add_values_amx(product, probs, s.values_t.data(), padded, vdim);
      for (int64_t d = 0; d < vdim; ++d) {
        for (r0 = 0; r0 < padded; r0 += kLanes) {
          float* a = acc + d * padded + r0;
          vec::store(a, vec::fmadd(vec::load(a), vec::load(alpha + r0), vec::load(product + d * padded + r0)));
        }
      }
      continue;
    }
    for (r0 = 0; r0 + 2 * kLanes <= padded; r0 += 2 * kLanes) {
      for (int64_t d = 0; d < vdim; d += kTileDims) {
        add_values<2, kTileDims>(acc + d * padded + r0, alpha + r0, probs + r0, values + d, num_pairs, padded, vdim);
      }
    }
    if (r0 < padded) {
      for (int64_t d = 0; d < vdim; d += kTileDims) {
        add_values<1, kTileDims>(acc + d * padded + r0, alpha + r0, probs + r0, values + d, num_pairs, padded, vdim);
      }
    }
  }

  for (int64_t r = 0; r < rows.count; ++r) {
    const float inv_sum = 1.f / s.row_sum[r];
    c10::BFloat16* o = pb.out_row(rows.token(r), rows.head(r));
    const float* acc = s.acc.data() + r;
    for (int64_t d = 0; d < vdim; ++d) o[d] = static_cast<c10::BFloat16>(acc[d * padded] * inv_sum);
  }
}

}  // namespace

void prefill_bf16(const Problem<c10::BFloat16>& problem, const PrefillPlan& plan) {
  const int64_t kv_heads = problem.num_kv_heads;
  const bool amx = problem.head_dim % 32 == 0 && problem.value_dim % 16 == 0 && cpu_has_amx_bf16();
  for_each_task(
      static_cast<int64_t>(plan.items.size()) * kv_heads,
      [&] { return Scratch(plan.max_rows, problem.head_dim, problem.value_dim, amx); },
      [&](int64_t task, Scratch& s) {
        const WorkItem& item = plan.items[task / kv_heads];
        if (amx) {
          attend_item<true>(problem, item, task % kv_heads, s);
        } else {
          attend_item<false>(problem, item, task % kv_heads, s);
        }
      });
}

}  // namespace fastgen::cpu::attention_kernels

FASTGEN_INTRINSICS_END

#endif  // FASTGEN_VEC_AVX512_BF16
