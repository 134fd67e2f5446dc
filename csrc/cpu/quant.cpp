// Block-quantized linear layers and dequantization on the CPU: the launchers of cpu/quant.h and
// their tensor adapters. Two kernels read core/quant_format.h's tiles:
//   - AVX512-VNNI (compiled for that target whatever -march says, chosen at run time): lanes are
//     the tile's 16 rows; per code vector, VPDPBUSD multiplies the 16 rows' 4 unsigned codes by 4
//     int8 activations broadcast to every lane and adds the 4 products into each row's int32
//     sum, so a 32-element group of 16 rows is 8 instructions per input row for 4-bit codes (the
//     nibbles split with one AND and one shift, Q5_K / Q6_K's high bits added under masks);
//   - AMX-INT8 (with AMX, for several input rows): per group of G codes, the tile's 16 rows of
//     unpacked codes are one B tile (G / 4 rows of 64 bytes: exactly the vectors' layout), up to
//     16 input rows' int8 digits an A tile each, and TDPBSUD makes the 16 x 16 int32 sums of a
//     digit in one instruction; the float epilogue is the VNNI kernel's, row by row;
//   - portable: the same sums with integer loops, for processors without AVX512-VNNI.
// This file is compiled with -ffp-contract=off (CMakeLists.txt): the float arithmetic is exactly
// what is written, fma where it says fma, so the two kernels agree to the bit.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "core/quant_decode.h"
#include "cpu/amx.h"
#include "cpu/quant.h"
#include "ops.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define FASTGEN_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#define FASTGEN_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma,amx-tile,amx-int8")))
#define FASTGEN_QUANT_UNROLL _Pragma("GCC unroll 8")

namespace fastgen::cpu {

using quant::code_at;
using quant::Format;
using quant::scale_at;
using quant::weight_value;
using quant::QType;
using quant::format_of;
using quant::kActBlock;
using quant::kTileRows;
using quant::kVectorBytes;

bool cpu_has_vnni512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
  }();
  return has;
}

namespace {

// ---- activations --------------------------------------------------------------------------

// Input rows quantized per 32 elements in two int8 digits: x ~ dx * qx + dx2 * qx2, where
// qx = nearbyint(x * (127 / max|x|)) and qx2 quantizes the remainder x - dx * qx the same way.
// One digit (llama.cpp's Q8 activations) leaves a relative error of ~1/254 of each block's
// largest element, 2-4x bf16's on SmolLM2's logits (enough to flip its near-ties); the second
// digit takes it below bf16's for one more VPDPBUSD per code vector (the weight's unpacking and
// its memory traffic are shared). xsum = dx * sum(qx) + dx2 * sum(qx2) per group, as float.
struct QuantizedInput {
  int64_t m = 0, k = 0;
  std::vector<int8_t> q, q2;      // [m, k]
  std::vector<float> dx, dx2;     // [m, k / 32]
  std::vector<float> xsum16;      // [m, k / 16]
  std::vector<float> xsum32;      // [m, k / 32]
  const int8_t* row(int64_t i) const { return q.data() + i * k; }
  const int8_t* row2(int64_t i) const { return q2.data() + i * k; }
};

constexpr int kAmxRows = 16;  // input rows per A tile

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// One int8 digit of 32 values: q = nearbyint(v * 127 / max|v|); returns the step max|v| / 127.
inline float quantize_digit(const float* v, int8_t* q, int sums[2]) {
  float amax = 0.f;
  for (int j = 0; j < kActBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  sums[0] = sums[1] = 0;
  for (int j = 0; j < kActBlock; ++j) {
    q[j] = static_cast<int8_t>(std::nearbyint(std::min(127.f, std::max(-127.f, v[j] * inv))));
    sums[j / 16] += q[j];
  }
  return amax / 127.f;
}

template <typename InT>
void quantize_input(QuantizedInput& a, const InT* input, int64_t stride, int64_t m, int64_t k) {
  a.m = m, a.k = k;
  const int64_t padded = (m + kAmxRows - 1) / kAmxRows * kAmxRows;  // whole A tiles (AMX)
  a.q.resize(padded * k);
  a.q2.resize(padded * k);
  a.dx.resize(m * k / kActBlock);
  a.dx2.resize(m * k / kActBlock);
  a.xsum16.resize(m * k / 16);
  a.xsum32.resize(m * k / kActBlock);
  const int64_t blocks = k / kActBlock;
  at::parallel_for(0, m * blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / blocks, b = idx % blocks;
      const InT* x = input + i * stride + b * kActBlock;
      float v[kActBlock], rest[kActBlock];
      for (int j = 0; j < kActBlock; ++j) v[j] = to_float(x[j]);
      int8_t* q = a.q.data() + i * k + b * kActBlock;
      int8_t* q2 = a.q2.data() + i * k + b * kActBlock;
      int sums[2], sums2[2];
      const float d = quantize_digit(v, q, sums);
      for (int j = 0; j < kActBlock; ++j) rest[j] = v[j] - d * static_cast<float>(q[j]);
      const float d2 = quantize_digit(rest, q2, sums2);
      a.dx[idx] = d, a.dx2[idx] = d2;
      for (int h = 0; h < 2; ++h)
        a.xsum16[idx * 2 + h] = std::fma(d2, static_cast<float>(sums2[h]), d * static_cast<float>(sums[h]));
      a.xsum32[idx] = std::fma(d2, static_cast<float>(sums2[0] + sums2[1]),
                               d * static_cast<float>(sums[0] + sums[1]));
    }
  });
}

// ---- the portable kernel (and the dequantizer) ---------------------------------------------

// out[i * 16 + r] for `count` input rows from i0 and the tile's 16 rows (all of them: padding
// rows are zero codes and zero scales).
template <QType Q>
void tile_portable(float* out, const uint8_t* tile, const QuantizedInput& a, int64_t i0,
                   int count, int64_t chunks) {
  constexpr Format F = format_of(Q);
  constexpr int G = F.group_elems;
  for (int i = 0; i < count; ++i) {
    const int8_t* x = a.row(i0 + i);
    const int8_t* x2 = a.row2(i0 + i);
    const float* dx = a.dx.data() + (i0 + i) * (a.k / kActBlock);
    const float* dx2 = a.dx2.data() + (i0 + i) * (a.k / kActBlock);
    const float* xsum = (G == 16 ? a.xsum16.data() + (i0 + i) * (a.k / 16)
                                 : a.xsum32.data() + (i0 + i) * (a.k / 32));
    for (int r = 0; r < kTileRows; ++r) {
      float acc = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const uint8_t* chunk = tile + c * F.chunk_bytes();
        for (int g = 0; g < F.groups(); ++g) {
          const int64_t e0 = c * F.super_elems + g * G;
          int32_t idot = 0, idot2 = 0;
          for (int e = 0; e < G; ++e) {
            const int code = code_at<Q>(chunk, r, g * G + e);
            idot += code * x[e0 + e];
            idot2 += code * x2[e0 + e];
          }
          float s, o;
          scale_at<Q>(chunk, r, g, s, o);
          const float u = std::fma(static_cast<float>(idot2), dx2[e0 / kActBlock],
                                   static_cast<float>(idot) * dx[e0 / kActBlock]);
          acc = std::fma(s, u, acc);
          acc = std::fma(o, xsum[e0 / G], acc);
        }
      }
      out[i * kTileRows + r] = acc;
    }
  }
}

// ---- the AVX512-VNNI kernel ------------------------------------------------------------------

FASTGEN_VNNI inline __m512 halves_to_float(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

FASTGEN_VNNI inline __m512i broadcast4(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return _mm512_set1_epi32(word);
}

// Weights bytes read ahead of the tile being walked; the hardware prefetcher follows one stream
// per thread well, this only covers the start of each chunk.
constexpr int kPrefetchAhead = 1024;

// (s, o) of group g of a chunk for its 16 rows (scale_at's, as vectors); d, dmin: the K-quants'
// super-block scales, loaded once per chunk by chunk_scales_vnni.
template <QType Q>
FASTGEN_VNNI inline void chunk_scales_vnni(const uint8_t* sc, __m512& d, __m512& dmin) {
  if constexpr (Q == QType::Q4_K || Q == QType::Q5_K) {
    d = halves_to_float(sc + 256), dmin = halves_to_float(sc + 288);
  } else if constexpr (Q == QType::Q6_K) {
    d = halves_to_float(sc + 256), dmin = _mm512_setzero_ps();
  } else {
    d = dmin = _mm512_setzero_ps();
  }
}

template <QType Q>
FASTGEN_VNNI inline void group_scales_vnni(const uint8_t* sc, int g, __m512 d, __m512 dmin,
                                           __m512& s, __m512& o) {
  if constexpr (Q == QType::Q4_0) {
    s = halves_to_float(sc), o = _mm512_mul_ps(s, _mm512_set1_ps(-8.f));
  } else if constexpr (Q == QType::Q4_1) {
    s = halves_to_float(sc), o = halves_to_float(sc + 32);
  } else if constexpr (Q == QType::Q8_0) {
    s = halves_to_float(sc), o = _mm512_mul_ps(s, _mm512_set1_ps(-128.f));
  } else if constexpr (Q == QType::Q4_K || Q == QType::Q5_K) {
    const __m128i scs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * 16));
    const __m128i mins = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 128 + g * 16));
    s = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(scs)));
    o = _mm512_mul_ps(_mm512_xor_ps(dmin, _mm512_set1_ps(-0.f)),  // -dmin, exactly
                      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mins)));
  } else {  // Q6_K
    const __m128i scs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * 16));
    s = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(scs)));
    o = _mm512_mul_ps(s, _mm512_set1_ps(-32.f));
  }
}

// The codes of vector vi of a chunk as bytes, 16 rows x 4 (lanes as the vector's bytes): lo for
// its low-nibble elements (or all of an 8-bit vector), hi for its high-nibble ones.
template <QType Q>
FASTGEN_VNNI inline void unpack_vector(const uint8_t* chunk, int vi, __m512i& lo, __m512i& hi) {
  constexpr Format F = format_of(Q);
  const __m512i w = _mm512_loadu_si512(chunk + vi * kVectorBytes);
  if constexpr (F.code_bits == 8) {
    lo = hi = w;
  } else {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    lo = _mm512_and_si512(w, low4);
    hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
    const uint64_t* masks = reinterpret_cast<const uint64_t*>(chunk + F.vectors * kVectorBytes);
    const __m512i bit4 = _mm512_set1_epi8(16), bit5 = _mm512_set1_epi8(32);
    if constexpr (F.code_bits == 5) {
      lo = _mm512_mask_add_epi8(lo, masks[2 * vi], lo, bit4);
      hi = _mm512_mask_add_epi8(hi, masks[2 * vi + 1], hi, bit4);
    } else if constexpr (F.code_bits == 6) {
      lo = _mm512_mask_add_epi8(lo, masks[4 * vi], lo, bit4);
      lo = _mm512_mask_add_epi8(lo, masks[4 * vi + 1], lo, bit5);
      hi = _mm512_mask_add_epi8(hi, masks[4 * vi + 2], hi, bit4);
      hi = _mm512_mask_add_epi8(hi, masks[4 * vi + 3], hi, bit5);
    }
  }
}

// One group's float epilogue for 16 rows: acc + s * (idot2 * dx2 + idot * dx) + o * xsum, in that
// order. The VNNI and AMX kernels both call it (the portable kernel writes it out in scalars), so
// that their results agree to the bit.
FASTGEN_VNNI inline __m512 add_group(__m512 acc, __m512i idot, __m512i idot2, float dx, float dx2,
                                     __m512 s, __m512 o, float xsum) {
  const __m512 u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(idot2), _mm512_set1_ps(dx2),
                                   _mm512_mul_ps(_mm512_cvtepi32_ps(idot), _mm512_set1_ps(dx)));
  return _mm512_fmadd_ps(o, _mm512_set1_ps(xsum), _mm512_fmadd_ps(s, u, acc));
}

template <QType Q, int MB>
FASTGEN_VNNI void tile_vnni(float* out, const uint8_t* tile, const QuantizedInput& a, int64_t i0,
                            int64_t chunks) {
  constexpr Format F = format_of(Q);
  constexpr int G = F.group_elems;
  constexpr int kEpv = F.elems_per_vector();
  constexpr int kVpg = F.vectors_per_group();
  const int64_t k = a.k;
  const int8_t* x[MB];
  const int8_t* x2[MB];
  const float* dx[MB];
  const float* dx2[MB];
  const float* xsum[MB];
  for (int i = 0; i < MB; ++i) {
    x[i] = a.row(i0 + i);
    x2[i] = a.row2(i0 + i);
    dx[i] = a.dx.data() + (i0 + i) * (k / kActBlock);
    dx2[i] = a.dx2.data() + (i0 + i) * (k / kActBlock);
    xsum[i] = G == 16 ? a.xsum16.data() + (i0 + i) * (k / 16) : a.xsum32.data() + (i0 + i) * (k / 32);
  }
  __m512 acc[MB];
  FASTGEN_QUANT_UNROLL
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();

  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* chunk = tile + c * F.chunk_bytes();
    const uint8_t* sc = chunk + quant::scales_offset(F);
    for (int p = 0; p < F.chunk_bytes(); p += 64) __builtin_prefetch(chunk + kPrefetchAhead + p);
    __m512 d, dmin;
    chunk_scales_vnni<Q>(sc, d, dmin);
    for (int g = 0; g < F.groups(); ++g) {
      const int64_t e0 = c * F.super_elems + g * G;
      __m512i idot[MB], idot2[MB];
      FASTGEN_QUANT_UNROLL
      for (int i = 0; i < MB; ++i) idot[i] = idot2[i] = _mm512_setzero_si512();
      FASTGEN_QUANT_UNROLL
      for (int v = 0; v < kVpg; ++v) {
        const int vi = g * kVpg + v;
        const int64_t e = e0 + v * kEpv;
        __m512i lo, hi;
        unpack_vector<Q>(chunk, vi, lo, hi);
        if constexpr (F.code_bits == 8) {
          FASTGEN_QUANT_UNROLL
          for (int i = 0; i < MB; ++i) {
            idot[i] = _mm512_dpbusd_epi32(idot[i], lo, broadcast4(x[i] + e));
            idot2[i] = _mm512_dpbusd_epi32(idot2[i], lo, broadcast4(x2[i] + e));
          }
        } else {
          FASTGEN_QUANT_UNROLL
          for (int i = 0; i < MB; ++i) {
            idot[i] = _mm512_dpbusd_epi32(idot[i], lo, broadcast4(x[i] + e));
            idot2[i] = _mm512_dpbusd_epi32(idot2[i], lo, broadcast4(x2[i] + e));
            idot[i] = _mm512_dpbusd_epi32(idot[i], hi, broadcast4(x[i] + e + 4));
            idot2[i] = _mm512_dpbusd_epi32(idot2[i], hi, broadcast4(x2[i] + e + 4));
          }
        }
      }
      __m512 s, o;
      group_scales_vnni<Q>(sc, g, d, dmin, s, o);
      FASTGEN_QUANT_UNROLL
      for (int i = 0; i < MB; ++i) {
        acc[i] = add_group(acc[i], idot[i], idot2[i], dx[i][e0 / kActBlock], dx2[i][e0 / kActBlock],
                           s, o, xsum[i][e0 / G]);
      }
    }
  }
  FASTGEN_QUANT_UNROLL
  for (int i = 0; i < MB; ++i) _mm512_storeu_ps(out + i * kTileRows, acc[i]);
}

template <QType Q>
FASTGEN_VNNI void tile_vnni_rows(float* out, const uint8_t* tile, const QuantizedInput& a,
                                 int64_t i0, int count, int64_t chunks) {
  switch (count) {
    case 1: return tile_vnni<Q, 1>(out, tile, a, i0, chunks);
    case 2: return tile_vnni<Q, 2>(out, tile, a, i0, chunks);
    case 3: return tile_vnni<Q, 3>(out, tile, a, i0, chunks);
    case 4: return tile_vnni<Q, 4>(out, tile, a, i0, chunks);
    case 5: return tile_vnni<Q, 5>(out, tile, a, i0, chunks);
    default: return tile_vnni<Q, 6>(out, tile, a, i0, chunks);
  }
}

static_assert(kQuantMaxRows == 6, "tile_vnni_rows dispatches counts 1..6");

// ---- the AMX-INT8 kernel -------------------------------------------------------------------

// Tiles: 0, 1 the A tiles of the two digits (16 input rows x G bytes), 2 the B tile (G / 4 rows
// x 16 tile rows x 4 codes), 3, 4 the two digits' int32 sums (16 input rows x 16 tile rows).
template <int G>
FASTGEN_AMX void configure_tiles() {
  TileConfig config(kAmxRows, kTileRows * 4);
  for (int t : {0, 1}) config.colsb[t] = G;
  config.rows[2] = G / 4;
  FASTGEN_LOAD_TILE_CONFIG(config);
}

// out[i * 16 + r] for `count` (<= 16) input rows from i0, as tile_vnni computes them: the same
// int32 sums, and the same float operations on them in the same order.
template <QType Q>
FASTGEN_AMX void tile_amx(float* out, const uint8_t* tile, const QuantizedInput& a, int64_t i0,
                          int count, int64_t chunks) {
  constexpr Format F = format_of(Q);
  constexpr int G = F.group_elems;
  constexpr int kVpg = F.vectors_per_group();
  const int64_t k = a.k, groups_per_row = k / G;
  alignas(64) uint8_t codes[G / 4 * kVectorBytes];  // a group's B tile, unpacked
  alignas(64) int32_t sums[2][kAmxRows * kTileRows];
  __m512 acc[kAmxRows];
  for (int i = 0; i < count; ++i) acc[i] = _mm512_setzero_ps();
  const int8_t* x = a.row(i0);
  const int8_t* x2 = a.row2(i0);
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* chunk = tile + c * F.chunk_bytes();
    const uint8_t* sc = chunk + quant::scales_offset(F);
    for (int p = 0; p < F.chunk_bytes(); p += 64) __builtin_prefetch(chunk + kPrefetchAhead + p);
    __m512 d, dmin;
    chunk_scales_vnni<Q>(sc, d, dmin);
    for (int g = 0; g < F.groups(); ++g) {
      const int64_t e0 = c * F.super_elems + g * G;
      if constexpr (F.code_bits == 8) {
        _tile_loadd(2, chunk + g * kVpg * kVectorBytes, kVectorBytes);  // already 4 codes a row
      } else {
        for (int v = 0; v < kVpg; ++v) {  // elements 8v .. 8v + 3, then 8v + 4 .. 8v + 7
          __m512i lo, hi;
          unpack_vector<Q>(chunk, g * kVpg + v, lo, hi);
          _mm512_store_si512(codes + (2 * v) * kVectorBytes, lo);
          _mm512_store_si512(codes + (2 * v + 1) * kVectorBytes, hi);
        }
        _tile_loadd(2, codes, kVectorBytes);
      }
      _tile_loadd(0, x + e0, k);
      _tile_loadd(1, x2 + e0, k);
      _tile_zero(3);
      _tile_zero(4);
      _tile_dpbsud(3, 0, 2);
      _tile_dpbsud(4, 1, 2);
      _tile_stored(3, sums[0], kTileRows * 4);
      _tile_stored(4, sums[1], kTileRows * 4);
      __m512 s, o;
      group_scales_vnni<Q>(sc, g, d, dmin, s, o);
      const int64_t block = e0 / kActBlock, group = e0 / G;
      for (int i = 0; i < count; ++i) {
        const int64_t row = i0 + i;
        const float xs = G == 16 ? a.xsum16[row * groups_per_row + group]
                                 : a.xsum32[row * groups_per_row + group];
        acc[i] = add_group(acc[i], _mm512_load_si512(sums[0] + i * kTileRows),
                           _mm512_load_si512(sums[1] + i * kTileRows),
                           a.dx[row * (k / kActBlock) + block], a.dx2[row * (k / kActBlock) + block],
                           s, o, xs);
      }
    }
  }
  for (int i = 0; i < count; ++i) _mm512_storeu_ps(out + i * kTileRows, acc[i]);
}

FASTGEN_AMX inline void release_tiles() { _tile_release(); }

inline void store(float* out, float v) { *out = v; }
inline void store(c10::Half* out, float v) { *out = c10::Half(v); }
inline void store(c10::BFloat16* out, float v) { *out = c10::BFloat16(v); }

template <QType Q, typename OutT>
void linear_tiles(OutT* out, int64_t out_stride, const uint8_t* packed, const QuantizedInput& a,
                  const float* bias, int64_t n, bool portable) {
  constexpr Format F = format_of(Q);
  const int64_t chunks = a.k / F.super_elems;
  const int64_t tile_bytes = chunks * F.chunk_bytes();
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  const bool vnni = !portable && cpu_has_vnni512();
  const bool amx = vnni && a.m >= kAmxMinRows && cpu_has_amx_int8();
  const int pass = amx ? kAmxRows : kQuantMaxRows;  // input rows per pass over a tile
  const int64_t grain = std::max<int64_t>(1, (48 << 10) / std::max<int64_t>(tile_bytes, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    float sums[kAmxRows * kTileRows];
    if (amx) configure_tiles<F.group_elems>();  // per thread
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tile = packed + t * tile_bytes;
      const int64_t row0 = t * kTileRows;
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, n - row0));
      for (int64_t i0 = 0; i0 < a.m; i0 += pass) {
        const int count = static_cast<int>(std::min<int64_t>(pass, a.m - i0));
        if (amx) {
          tile_amx<Q>(sums, tile, a, i0, count, chunks);
        } else if (vnni) {
          tile_vnni_rows<Q>(sums, tile, a, i0, count, chunks);
        } else {
          tile_portable<Q>(sums, tile, a, i0, count, chunks);
        }
        for (int i = 0; i < count; ++i)
          for (int r = 0; r < rows; ++r) {
            const float b = bias ? bias[row0 + r] : 0.f;
            store(out + (i0 + i) * out_stride + row0 + r, sums[i * kTileRows + r] + b);
          }
      }
    }
    if (amx) release_tiles();
  });
}

// A row's G codes of a group are G / 4 words spread over the group's code vectors (lane r of a
// vector = row r's 4 bytes): in element order, the vectors' lo (and, with 4-bit codes, hi)
// halves. transpose_words turns those W = G / 4 vectors of 16 lanes into rows: log2(W) perfect
// shuffles of the W x 16 word matrix (each rotates the word index's bits by one), after which
// word w of row r is word r * W + w of the concatenated vectors.
template <int W>
FASTGEN_VNNI inline void transpose_words(__m512i* v) {
  static_assert(W == 4 || W == 8, "groups of 16 or 32 codes");
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int round = 0; round < (W == 8 ? 3 : 2); ++round) {
    __m512i out[W];
    for (int j = 0; j < W / 2; ++j) {
      out[2 * j] = _mm512_permutex2var_epi32(v[j], lo, v[j + W / 2]);
      out[2 * j + 1] = _mm512_permutex2var_epi32(v[j], hi, v[j + W / 2]);
    }
    for (int j = 0; j < W; ++j) v[j] = out[j];
  }
}

// 16 weights (weight_value's arithmetic, lane by lane) stored as OutT, rounded to nearest even.
template <QType Q, typename OutT>
FASTGEN_VNNI inline void store_weights(OutT* dst, __m128i codes8, __m512 s, __m512 o) {
  const __m512i codes = _mm512_cvtepu8_epi32(codes8);
  __m512 w;
  if constexpr (Q == QType::Q4_0 || Q == QType::Q8_0 || Q == QType::Q6_K) {
    constexpr int bias = Q == QType::Q4_0 ? 8 : Q == QType::Q8_0 ? 128 : 32;
    w = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(codes, _mm512_set1_epi32(bias))));
  } else {
    w = _mm512_add_ps(_mm512_mul_ps(s, _mm512_cvtepi32_ps(codes)), o);
  }
  if constexpr (std::is_same_v<OutT, c10::BFloat16>) {
    const __m512i bits = _mm512_castps_si512(w);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  } else if constexpr (std::is_same_v<OutT, c10::Half>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    _mm512_storeu_ps(dst, w);
  }
}

// Rows row0 .. row0 + rows - 1 (one tile) of W into out (rows k apart), as dequantize_rows
// computes them: per group, the codes are transposed into rows in registers (transpose_words)
// and each row's G weights are written as G / 16 vectors of 16, straight into out.
template <QType Q, typename OutT>
FASTGEN_VNNI void dequantize_tile_vnni(OutT* out, const uint8_t* tile, int rows, int64_t k) {
  constexpr Format F = format_of(Q);
  constexpr int G = F.group_elems;
  constexpr int W = G / 4;              // words of a row's group
  constexpr int kPieces = G / 16;       // 16-code pieces of a row's group
  const int64_t chunks = k / F.super_elems;
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* chunk = tile + c * F.chunk_bytes();
    const uint8_t* sc = chunk + quant::scales_offset(F);
    __m512 d, dmin;
    chunk_scales_vnni<Q>(sc, d, dmin);
    for (int g = 0; g < F.groups(); ++g) {
      __m512 s, o;
      group_scales_vnni<Q>(sc, g, d, dmin, s, o);
      alignas(64) float s_rows[kTileRows], o_rows[kTileRows];
      _mm512_store_ps(s_rows, s);
      _mm512_store_ps(o_rows, o);
      __m512i words[W];
      for (int v = 0; v < F.vectors_per_group(); ++v) {
        __m512i lo, hi;
        unpack_vector<Q>(chunk, g * F.vectors_per_group() + v, lo, hi);
        if constexpr (F.code_bits == 8) {
          words[v] = lo;
        } else {
          words[2 * v] = lo, words[2 * v + 1] = hi;
        }
      }
      transpose_words<W>(words);
      OutT* dst = out + c * F.super_elems + g * G;
      _Pragma("GCC unroll 16")
      for (int r = 0; r < kTileRows; ++r) {  // unrolled: every lane below is a constant
        if (r == rows) break;
        const __m512 sr = _mm512_set1_ps(s_rows[r]), orow = _mm512_set1_ps(o_rows[r]);
        for (int p = 0; p < kPieces; ++p) {
          const int lane = r * kPieces + p;  // 128-bit lane of the transposed words
          const __m512i vec = words[lane / 4];
          const __m128i codes8 = lane % 4 == 0 ? _mm512_castsi512_si128(vec)
                                 : lane % 4 == 1 ? _mm512_extracti32x4_epi32(vec, 1)
                                 : lane % 4 == 2 ? _mm512_extracti32x4_epi32(vec, 2)
                                                 : _mm512_extracti32x4_epi32(vec, 3);
          store_weights<Q>(dst + r * k + p * 16, codes8, sr, orow);
        }
      }
    }
  }
}

template <QType Q, typename OutT>
void dequantize_rows(OutT* out, const uint8_t* packed, const int64_t* rows, int64_t count,
                     int64_t k) {
  constexpr Format F = format_of(Q);
  const int64_t chunks = k / F.super_elems;
  const int64_t tile_bytes = chunks * F.chunk_bytes();
  if (rows == nullptr && cpu_has_vnni512()) {  // the whole weight (prefill): tile by tile
    at::parallel_for(0, (count + kTileRows - 1) / kTileRows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        dequantize_tile_vnni<Q>(out + t * kTileRows * k, packed + t * tile_bytes,
                                static_cast<int>(std::min<int64_t>(kTileRows, count - t * kTileRows)), k);
    });
    return;
  }
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = rows ? rows[i] : i;
      const uint8_t* tile = packed + (row / kTileRows) * tile_bytes;
      const int r = static_cast<int>(row % kTileRows);
      OutT* dst = out + i * k;
      for (int64_t c = 0; c < chunks; ++c) {
        const uint8_t* chunk = tile + c * F.chunk_bytes();
        for (int g = 0; g < F.groups(); ++g) {
          float s, o;
          scale_at<Q>(chunk, r, g, s, o);
          for (int e = 0; e < F.group_elems; ++e) {
            const int ce = g * F.group_elems + e;
            store(dst + c * F.super_elems + ce, weight_value<Q>(s, o, code_at<Q>(chunk, r, ce)));
          }
        }
      }
    }
  });
}

}  // namespace

template <typename InT, typename OutT>
void quant_linear_launch(OutT* out, int64_t out_stride, const InT* input, int64_t input_stride,
                         const uint8_t* packed, QType qtype, const float* bias, int64_t m,
                         int64_t n, int64_t k, bool portable) {
  if (m == 0 || n == 0) return;
  thread_local QuantizedInput a;  // reused between calls: decode steps allocate nothing
  quantize_input(a, input, input_stride, m, k);
  FASTGEN_DISPATCH_QTYPE(qtype, [&] {
    linear_tiles<Q>(out, out_stride, packed, a, bias, n, portable);
  });
}

template <typename OutT>
void quant_dequantize_launch(OutT* out, const uint8_t* packed, QType qtype, const int64_t* rows,
                             int64_t count, int64_t k) {
  if (count == 0) return;
  FASTGEN_DISPATCH_QTYPE(qtype, [&] { dequantize_rows<Q>(out, packed, rows, count, k); });
}

#define FASTGEN_INSTANTIATE(InT, OutT)                                                        \
  template void quant_linear_launch<InT, OutT>(OutT*, int64_t, const InT*, int64_t,           \
                                               const uint8_t*, QType, const float*, int64_t,  \
                                               int64_t, int64_t, bool);
FASTGEN_INSTANTIATE(float, float)
FASTGEN_INSTANTIATE(c10::BFloat16, c10::BFloat16)
FASTGEN_INSTANTIATE(c10::BFloat16, float)
FASTGEN_INSTANTIATE(c10::Half, c10::Half)
FASTGEN_INSTANTIATE(c10::Half, float)
#undef FASTGEN_INSTANTIATE
template void quant_dequantize_launch<float>(float*, const uint8_t*, QType, const int64_t*, int64_t, int64_t);
template void quant_dequantize_launch<c10::BFloat16>(c10::BFloat16*, const uint8_t*, QType, const int64_t*, int64_t, int64_t);
template void quant_dequantize_launch<c10::Half>(c10::Half*, const uint8_t*, QType, const int64_t*, int64_t, int64_t);

// ---- tensor adapters -------------------------------------------------------------------------

void quant_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                  int64_t qtype, int64_t n, const std::optional<at::Tensor>& bias,
                  bool portable) {
  check_quant_linear_args(out, input, packed, qtype, n, bias);
  const int64_t m = input.size(0), k = input.size(1);
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const auto q = static_cast<QType>(qtype);
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), "quant_linear", [&] {
    auto launch = [&](auto* out_ptr) {
      quant_linear_launch(out_ptr, out.stride(0), input.data_ptr<scalar_t>(), input.stride(0),
                          packed.data_ptr<uint8_t>(), q, b, m, n, k, portable);
    };
    if (out.scalar_type() == input.scalar_type()) {
      launch(out.data_ptr<scalar_t>());
    } else {
      launch(out.data_ptr<float>());
    }
  });
}

void quant_dequantize(at::Tensor& out, const at::Tensor& packed, int64_t qtype,
                      const std::optional<at::Tensor>& rows) {
  check_quant_dequantize_args(out, packed, qtype, rows);
  const int64_t* row_ptr = rows ? rows->data_ptr<int64_t>() : nullptr;
  const auto q = static_cast<QType>(qtype);
  FASTGEN_DISPATCH_FLOAT(out.scalar_type(), "quant_dequantize", [&] {
    quant_dequantize_launch(out.data_ptr<scalar_t>(), packed.data_ptr<uint8_t>(), q, row_ptr,
                            out.size(0), out.size(1));
  });
}

}  // namespace fastgen::cpu
