// The register tile behind the CPU's weight-streaming kernels (cpu/linear.cpp, cpu/moe.cpp):
// sums[i][r] = dot(input row i, weight row r) for up to kMaxInputs input rows and R weight rows,
// walked along K one vector at a time, so that each weight vector loaded serves every input row
// of the tile. A caller splits a weight's rows over threads in contiguous runs and walks each
// group of R rows once per kMaxInputs input rows (the later passes read the rows from L1 / L2),
// so the weight streams from memory once. The kernels, and why they are shaped so:
//   - bf16 with AVX512-BF16 (VDPBF16PS, dot_tile_dpbf16): 32 products per instruction, each pair
//     summed into fp32; the input is first repacked (pack_rows) so a step's input vectors are
//     adjacent, and a tile's sums are reduced four registers at a time (a transposing tree) once
//     at the end of K; every other type / machine (dot_tile) loads both operands as fp32
//     (cpu/vec.h) and uses FMA;
//   - K tails are masked loads (zeros contribute nothing);
//   - each sum's arithmetic depends only on its own two rows: never on how many other input
//     rows share its tile, nor where in the tile it sits (every accumulator is reduced by the same
//     tree). A token's result is bitwise the same alone and in any batch.
//
// VDPBF16PS semantics (Intel SDM): for each fp32 lane j, acc += x[2j+1] * w[2j+1], then
// acc += x[2j] * w[2j], each step rounded to fp32 with round-to-nearest-even whatever MXCSR says,
// denormal inputs read as zero and denormal results flushed to zero. A product of two bf16 (8-bit
// significands) is exact in fp32, so the only roundings are the fp32 additions, as in an fp32 FMA
// loop; the differences are the summation order and the flushing of values below 1.2e-38.
//
// Usage (R weight rows w [R, k], `count` <= kMaxInputs input rows):
//   float sums[kMaxInputs][R];
//   gemv::dot_rows<R, kMaxInputs>(inputs, i0, count, k, w, ahead, pass, passes, sums);
// where inputs is [m, k] (rows k apart) or, with kPacked<T>, pack_rows<kMaxInputs>'s layout.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>

#include "cpu/vec.h"

#if defined(FASTGEN_VEC_AVX512) && defined(__AVX512BF16__)
#define FASTGEN_CPU_DPBF16 1
#endif

// GCC 12's AVX-512 reductions read an _mm*_undefined_* operand, which -Wuninitialized reports
// wherever they are inlined (GCC bug 105593, as in cpu/vec.h); the code here is clean.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Fully unrolls the loops over a tile's rows. GCC otherwise keeps the accumulator arrays in memory
// and stores all of them on every step along K (measured: ~3x slower at 4 input rows).
#define FASTGEN_UNROLL _Pragma("GCC unroll 32")

namespace fastgen::cpu::gemv {

// A tile is kRows weight rows x up to kMaxInputs input rows, one fp32 accumulator vector each:
// per step along K it loads kRows + kMaxInputs vectors for kRows * kMaxInputs dot products. 4 x 6
// (24 accumulators + 4 weight vectors + 1 input vector of AVX-512's 32 registers) measured best
// (weights in L2, one thread) of 4x4, 6x4, 3x8, 2x8, 2x12, 2x16, 1x16 at M = 4, 8 and 16; with
// 16 registers (AVX2) 4 x 4.
constexpr int kRows = 4;
#if defined(FASTGEN_VEC_AVX512)
constexpr int kMaxInputs = 6;
#else
constexpr int kMaxInputs = 4;
#endif
// Work below this many weight bytes stays on one thread (a fork costs a few microseconds).
constexpr int64_t kMinBytesPerTask = 64 << 10;

// Weight bytes to prefetch ahead of the group of R rows being read. The hardware prefetcher
// follows long rows well but not R interleaved short ones (K = 576: 1152-byte rows), so each
// step along K also prefetches as many bytes as it reads, this far ahead in the linear stream.
constexpr int64_t kPrefetchExtra = 8192;

// Prefetches kBytes bytes (a multiple of 64) from p into L1; past the weight's end it is a no-op.
template <int64_t kBytes>
inline void prefetch(const char* p) {
  for (int64_t b = 0; b < kBytes; b += 64) __builtin_prefetch(p + b);
}

// Whether bf16 runs through dot_tile_dpbf16, on an input repacked by pack_rows.
template <typename T>
constexpr bool kPacked =
#if defined(FASTGEN_CPU_DPBF16)
    std::is_same_v<T, c10::BFloat16>;
#else
    false;
#endif

// Elements of one input row in the layout dot_rows reads: k, or k rounded up to whole steps of
// 32 when packed. Input row i starts i * packed_row_elems<T>(k) elements into its buffer.
template <typename T>
inline int64_t packed_row_elems(int64_t k) {
  return kPacked<T> ? (k + 31) / 32 * 32 : k;
}

#if defined(FASTGEN_CPU_DPBF16)
// [sum(a), sum(b), sum(c), sum(d)]: four horizontal sums at once, transposing as they go
// (12 shuffles and adds for four sums, against 7 per sum one at a time). Each source's sum is the
// same tree whatever its position and the other sources: ((b0 + b2) + (b1 + b3)) over its 128-bit
// blocks, then ((l0 + l1) + (l2 + l3)) over the lanes.
inline __m128 reduce_add4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // 128-bit blocks: ab = [a0+a2, a1+a3, b0+b2, b1+b3], then abcd block i = source i's 4 lanes.
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));  // + the neighbouring lane
  s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));  // + the other pair: every lane its block's sum
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s));
}

// One step along K: acc[i][r] += x row i . w row r over 32 bf16. The MB input vectors are adjacent
// (pack_rows' layout); the last step keeps only the k - j < 32 elements left (mask), and the
// zeros loaded past them add nothing.
template <int MB, int R, bool kTail>
[[gnu::always_inline]] inline void dpbf16_step(__m512 (&acc)[MB][R], const c10::BFloat16* x,
                                               const c10::BFloat16* w, int64_t k, __mmask32 mask) {
  __m512bh wv[R];
  FASTGEN_UNROLL
  for (int r = 0; r < R; ++r)
    wv[r] = (__m512bh)(kTail ? _mm512_maskz_loadu_epi16(mask, w + r * k) : _mm512_loadu_si512(w + r * k));
  FASTGEN_UNROLL
  for (int i = 0; i < MB; ++i) {
    const __m512bh xv =
        (__m512bh)(kTail ? _mm512_maskz_loadu_epi16(mask, x + i * 32) : _mm512_loadu_si512(x + i * 32));
    FASTGEN_UNROLL
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
  }
}

// sums[i][r] = dot(x row i, w row r) for MB input rows and R weight rows, 32 bf16 per step.
template <int MB, int R>
inline void dot_tile_dpbf16(const c10::BFloat16* x,  // [ceil(k / 32), MB, 32], from pack_rows
                            const c10::BFloat16* w,  // [R, k]
                            int64_t k, const char* ahead, int64_t pass, int64_t passes,
                            float (*sums)[R]) {  // [MB, R]
  __m512 acc[MB][R];
  FASTGEN_UNROLL
  for (int i = 0; i < MB; ++i)
    FASTGEN_UNROLL
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  // Pass `pass` of `passes` over these rows prefetches the lines of every passes-th step from step
  // `pass` on, so the next rows keep streaming in while this tile's later passes run from cache.
  int64_t countdown = pass;
  int64_t j = 0;
  for (; j + 32 <= k; j += 32, x += MB * 32) {
    if (countdown == 0) {
      prefetch<R * 64>(ahead + j * R * 2);
      countdown = passes;
    }
    --countdown;
    dpbf16_step<MB, R, false>(acc, x, w + j, k, 0);
  }
  if (j < k) dpbf16_step<MB, R, true>(acc, x, w + j, k, static_cast<__mmask32>((1u << (k - j)) - 1u));
  // sums is [MB][R] in memory: flat index f = i * R + r, reduced four at a time; a last group of
  // fewer than four is padded with zero vectors, so every sum goes through the same tree.
  constexpr int kSums = MB * R;
  float* flat = &sums[0][0];
  FASTGEN_UNROLL
  for (int f = 0; f + 4 <= kSums; f += 4)
    _mm_storeu_ps(flat + f, reduce_add4(acc[f / R][f % R], acc[(f + 1) / R][(f + 1) % R],
                                        acc[(f + 2) / R][(f + 2) % R], acc[(f + 3) / R][(f + 3) % R]));
  if constexpr (kSums % 4 != 0) {
    constexpr int f = kSums / 4 * 4;
    auto source = [&](int g) { return g < kSums ? acc[g / R][g % R] : _mm512_setzero_ps(); };
    alignas(16) float last[4];
    _mm_store_ps(last, reduce_add4(source(f), source(f + 1), source(f + 2), source(f + 3)));
    for (int g = f; g < kSums; ++g) flat[g] = last[g - f];
  }
}
#endif

// The input layout dot_tile_dpbf16 reads, written into packed (m * packed_row_elems(k)
// elements): rows row(0), ..., row(m - 1) (each k bf16) in groups of MB (the last one may hold
// fewer, count), each group [ceil(k / 32), count, 32], so that a step's input vectors sit at fixed
// offsets from one pointer (one integer register, not one per row: GCC spilled row pointers).
// The group of rows i0.. starts at i0 * ceil(k / 32) * 32; one row is its own layout (zero-padded
// to whole steps). Without AVX512-BF16, rows are copied as they are (packed_row_elems(k) = k).
template <int MB, typename T, typename RowFn>
void pack_rows(T* packed, int64_t m, int64_t k, RowFn row) {
#if defined(FASTGEN_CPU_DPBF16)
  if constexpr (kPacked<T>) {
    const int64_t steps = (k + 31) / 32;
    for (int64_t i0 = 0; i0 < m; i0 += MB) {
      const int64_t count = std::min<int64_t>(m - i0, MB);
      T* group = packed + i0 * steps * 32;
      for (int64_t i = 0; i < count; ++i) {
        const T* src = row(i0 + i);
        for (int64_t s = 0; s < steps; ++s) {
          const __mmask32 mask = k - s * 32 >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (k - s * 32)) - 1u);
          _mm512_storeu_si512(group + (s * count + i) * 32, _mm512_maskz_loadu_epi16(mask, src + s * 32));
        }
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < m; ++i) std::copy_n(row(i), k, packed + i * k);
}

// The same tile in fp32 through cpu/vec.h: both operands loaded as fp32, one FMA per lane.
template <int MB, int R, typename T>
inline void dot_tile(const T* x,  // [MB, k], rows x_stride apart
                     int64_t x_stride,
                     const T* w,  // [R, k]
                     int64_t k, const char* ahead,
                     float (*sums)[R]) {  // [MB, R]
  using namespace vec;
  Vec acc[MB][R];
  FASTGEN_UNROLL
  for (int i = 0; i < MB; ++i)
    FASTGEN_UNROLL
    for (int r = 0; r < R; ++r) acc[i][r] = zero();
  int64_t j = 0;
  for (; j + kWidth <= k; j += kWidth) {
    if (ahead) prefetch<R * kWidth * sizeof(T)>(ahead + j * R * sizeof(T));
    Vec wv[R];
    FASTGEN_UNROLL
    for (int r = 0; r < R; ++r) wv[r] = vec::load(w + r * k + j);
    FASTGEN_UNROLL
    for (int i = 0; i < MB; ++i) {
      const Vec xv = vec::load(x + i * x_stride + j);
      FASTGEN_UNROLL
      for (int r = 0; r < R; ++r) acc[i][r] = fmadd(xv, wv[r], acc[i][r]);
    }
  }
  if (j < k) {
    Vec wv[R];
    FASTGEN_UNROLL
    for (int r = 0; r < R; ++r) wv[r] = vec::load(w + r * k + j, k - j);
    FASTGEN_UNROLL
    for (int i = 0; i < MB; ++i) {
      const Vec xv = vec::load(x + i * x_stride + j, k - j);
      FASTGEN_UNROLL
      for (int r = 0; r < R; ++r) acc[i][r] = fmadd(xv, wv[r], acc[i][r]);
    }
  }
  FASTGEN_UNROLL
  for (int i = 0; i < MB; ++i)
    FASTGEN_UNROLL
    for (int r = 0; r < R; ++r) sums[i][r] = reduce_add(acc[i][r]);
}

// Calls f(std::integral_constant<int, count>{}) for a runtime 1 <= count <= kMax.
template <int kMax, typename F>
inline void with_count(int64_t count, F&& f) {
  if constexpr (kMax > 1) {
    if (count < kMax) return with_count<kMax - 1>(count, f);
  }
  f(std::integral_constant<int, kMax>{});
}

// sums[i][r] = dot(input row i0 + i, w row r) for the 1 <= count <= MB input rows i0.. of
// inputs (pass i0 / MB of `passes` over these R weight rows), with the weight stream prefetched
// at `ahead`. inputs: [m, k] with rows input_stride apart or, with kPacked<T>, pack_rows<MB>'s
// layout (input_stride unused).
template <int R, int MB, typename T>
inline void dot_rows(const T* inputs, int64_t input_stride, int64_t i0, int64_t count, int64_t k,
                     const T* w,  // [R, k]
                     const char* ahead, int64_t passes, float (*sums)[R]) {  // [MB, R]
  with_count<MB>(count, [&](auto c) {
    constexpr int kCount = decltype(c)::value;
#if defined(FASTGEN_CPU_DPBF16)
    if constexpr (kPacked<T>) {
      return dot_tile_dpbf16<kCount, R>(inputs + i0 * packed_row_elems<T>(k), w, k, ahead, i0 / MB, passes, sums);
    }
#endif
    // Only the first pass prefetches (these types are not decode's).
    dot_tile<kCount, R>(inputs + i0 * input_stride, input_stride, w, k, i0 == 0 ? ahead : nullptr, sums);
  });
}

}  // namespace fastgen::cpu::gemv

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
