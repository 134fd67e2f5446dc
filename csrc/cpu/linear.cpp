// Linear (out = input @ weight^T + bias) on the CPU for few input rows: decode's GEMV / skinny
// GEMM, which reads every weight once per step and so runs at the speed the weight streams in.
// torch's bf16 path reaches ~13 GB/s there; this kernel is written for the stream:
//   - the weight rows are split over threads in contiguous runs (at::parallel_for over groups of
//     kRows rows), so every core streams its own part of the weight, front to back;
//   - a tile is kRows weight rows x up to kMaxInputs input rows (4 x 6 with AVX-512), one fp32
//     accumulator register each, walked along K one vector at a time, so each weight vector loaded
//     serves every input row of the pass; with more input rows the same kRows rows are walked
//     again, from L1 / L2, so the weight is read from memory once;
//   - bf16 with AVX512-BF16 (VDPBF16PS): 32 products per instruction, each pair summed into fp32;
//     the input is first repacked so a step's input vectors are adjacent, and a tile's sums are
//     reduced four registers at a time (a transposing tree) once at the end of K; every other
//     type / machine loads both operands as fp32 (cpu/vec.h) and uses FMA;
//   - K tails are masked loads (zeros contribute nothing), N tails are tiles of one row.
// The fp32 sums get the bias (in fp32) and are rounded once, to T or to float32 (logits).
//
// VDPBF16PS semantics (Intel SDM): for each fp32 lane j, acc += x[2j+1] * w[2j+1], then
// acc += x[2j] * w[2j], each step rounded to fp32 with round-to-nearest-even whatever MXCSR says,
// denormal inputs read as zero and denormal results flushed to zero. A product of two bf16 (8-bit
// significands) is exact in fp32, so the only roundings are the fp32 additions, as in an fp32 FMA
// loop; the differences are the summation order and the flushing of values below 1.2e-38.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cpu/linear.h"
#include "cpu/vec.h"
#include "ops.h"

#if defined(FASTGEN_VEC_AVX512) && defined(__AVX512BF16__)
#define FASTGEN_LINEAR_DPBF16 1
#endif

// GCC 12's AVX-512 reductions read an _mm*_undefined_* operand, which -Wuninitialized reports
// wherever they are inlined (GCC bug 105593, as in cpu/vec.h); the code here is clean.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace fastgen::cpu {

namespace {

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

// Fully unrolls the loops over a tile's rows. GCC otherwise keeps the accumulator arrays in memory
// and stores all of them on every step along K (measured: ~3x slower at 4 input rows).
#define FASTGEN_UNROLL _Pragma("GCC unroll 32")

// Weight bytes to prefetch ahead of the group of R rows being read. The hardware prefetcher
// follows long rows well but not R interleaved short ones (K = 576: 1152-byte rows), so each
// step along K also prefetches as many bytes as it reads, this far ahead in the linear stream.
constexpr int64_t kPrefetchExtra = 8192;

// Prefetches kBytes bytes (a multiple of 64) from p into L1; past the weight's end it is a no-op.
template <int64_t kBytes>
inline void prefetch(const char* p) {
  for (int64_t b = 0; b < kBytes; b += 64) __builtin_prefetch(p + b);
}

#if defined(FASTGEN_LINEAR_DPBF16)
// [sum(a), sum(b), sum(c), sum(d)]: four horizontal sums at once, transposing as they go
// (12 shuffles and adds for four sums, against 7 per sum one at a time).
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
// (pack_input's layout); the last step keeps only the k - j < 32 elements left (mask), and the
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
inline void dot_tile_dpbf16(const c10::BFloat16* x,  // [ceil(k / 32), MB, 32], from pack_input
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
  // sums is [MB][R] in memory: flat index f = i * R + r, reduced four at a time.
  constexpr int kSums = MB * R;
  float* flat = &sums[0][0];
  FASTGEN_UNROLL
  for (int f = 0; f + 4 <= kSums; f += 4)
    _mm_storeu_ps(flat + f, reduce_add4(acc[f / R][f % R], acc[(f + 1) / R][(f + 1) % R],
                                        acc[(f + 2) / R][(f + 2) % R], acc[(f + 3) / R][(f + 3) % R]));
  FASTGEN_UNROLL
  for (int f = kSums / 4 * 4; f < kSums; ++f) flat[f] = _mm512_reduce_add_ps(acc[f / R][f % R]);
}

// The input repacked for dot_tile_dpbf16: rows in groups of MB (the last one may hold fewer,
// count), each group [ceil(k / 32), count, 32], so that a step's input vectors sit at fixed
// offsets from one pointer (one integer register, not one per row: GCC spilled row pointers).
// The group of rows i0.. starts at i0 * ceil(k / 32) * 32; one row (m = 1) is its own layout.
template <int MB>
std::vector<c10::BFloat16> pack_input(const c10::BFloat16* input,  // [m, k], rows stride apart
                                      int64_t m, int64_t k, int64_t stride) {
  const int64_t steps = (k + 31) / 32;
  std::vector<c10::BFloat16> packed(m * steps * 32);
  for (int64_t i0 = 0; i0 < m; i0 += MB) {
    const int64_t count = std::min<int64_t>(m - i0, MB);
    c10::BFloat16* group = packed.data() + i0 * steps * 32;
    for (int64_t i = 0; i < count; ++i)
      for (int64_t s = 0; s < steps; ++s) {
        const __mmask32 mask = k - s * 32 >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (k - s * 32)) - 1u);
        _mm512_storeu_si512(group + (s * count + i) * 32, _mm512_maskz_loadu_epi16(mask, input + (i0 + i) * stride + s * 32));
      }
  }
  return packed;
}
#endif

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
    for (int r = 0; r < R; ++r) wv[r] = load(w + r * k + j);
    FASTGEN_UNROLL
    for (int i = 0; i < MB; ++i) {
      const Vec xv = load(x + i * x_stride + j);
      FASTGEN_UNROLL
      for (int r = 0; r < R; ++r) acc[i][r] = fmadd(xv, wv[r], acc[i][r]);
    }
  }
  if (j < k) {
    Vec wv[R];
    FASTGEN_UNROLL
    for (int r = 0; r < R; ++r) wv[r] = load(w + r * k + j, k - j);
    FASTGEN_UNROLL
    for (int i = 0; i < MB; ++i) {
      const Vec xv = load(x + i * x_stride + j, k - j);
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

// Whether bf16 runs through dot_tile_dpbf16, on an input repacked by pack_input.
template <typename T>
constexpr bool kPacked =
#if defined(FASTGEN_LINEAR_DPBF16)
    std::is_same_v<T, c10::BFloat16>;
#else
    false;
#endif

// out[:, row : row + R] for every input row, MB input rows at a time. input is [m, k] with rows
// input_stride apart, or with kPacked<T>, pack_input<MB>'s layout.
template <int R, int MB, typename T, typename OutT>
inline void rows_tile(OutT* out, const T* input, const T* weight, const T* bias, int64_t m,
                      int64_t n, int64_t k, int64_t input_stride, int64_t row) {
  const T* w = weight + row * k;
  // Where the weight stream is prefetched: kPrefetchExtra bytes past these rows.
  const char* ahead = reinterpret_cast<const char*>(w + R * k) + kPrefetchExtra;
  const int64_t passes = (m + MB - 1) / MB;
  float sums[MB][R];
  for (int64_t i0 = 0; i0 < m; i0 += MB) {
    const int64_t count = std::min<int64_t>(m - i0, MB);
    with_count<MB>(count, [&](auto c) {
      constexpr int kCount = decltype(c)::value;
#if defined(FASTGEN_LINEAR_DPBF16)
      if constexpr (kPacked<T>) {
        return dot_tile_dpbf16<kCount, R>(input + i0 * ((k + 31) / 32 * 32), w, k, ahead, i0 / MB, passes, sums);
      }
#endif
      // Only the first pass prefetches (these types are not decode's).
      dot_tile<kCount, R>(input + i0 * input_stride, input_stride, w, k, i0 == 0 ? ahead : nullptr, sums);
    });
    for (int64_t i = 0; i < count; ++i)
      FASTGEN_UNROLL
      for (int r = 0; r < R; ++r) {
        const float b = bias ? static_cast<float>(bias[row + r]) : 0.f;
        out[(i0 + i) * n + row + r] = static_cast<OutT>(sums[i][r] + b);
      }
  }
}

// The weight rows split over threads in contiguous runs of R-row groups; N tails are 1-row tiles.
template <int R, int MB, typename T, typename OutT>
void launch_tiles(OutT* out, const T* input, const T* weight, const T* bias, int64_t m, int64_t n,
                  int64_t k, int64_t input_stride) {
#if defined(FASTGEN_LINEAR_DPBF16)
  std::vector<c10::BFloat16> packed;
  if constexpr (kPacked<T>) {
    if (m > 1) {
      packed = pack_input<MB>(input, m, k, input_stride);
      input = packed.data();
    }
  }
#endif
  const int64_t groups = (n + R - 1) / R;
  const int64_t group_bytes = R * std::max<int64_t>(k, 1) * static_cast<int64_t>(sizeof(T));
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / group_bytes);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    const int64_t row_end = std::min(end * R, n);
    int64_t row = begin * R;
    for (; row + R <= row_end; row += R) rows_tile<R, MB>(out, input, weight, bias, m, n, k, input_stride, row);
    for (; row < row_end; ++row) rows_tile<1, MB>(out, input, weight, bias, m, n, k, input_stride, row);
  });
}

}  // namespace

template <typename T, typename OutT>
void linear_launch(OutT* out, const T* input, const T* weight, const T* bias, int64_t m, int64_t n,
                   int64_t k, int64_t input_stride) {
  if (m == 0 || n == 0) return;
  launch_tiles<kRows, kMaxInputs>(out, input, weight, bias, m, n, k, input_stride);
}

#define FASTGEN_INSTANTIATE(T, OutT) \
  template void linear_launch<T, OutT>(OutT*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t);
FASTGEN_INSTANTIATE(float, float)
FASTGEN_INSTANTIATE(c10::Half, c10::Half)
FASTGEN_INSTANTIATE(c10::Half, float)
FASTGEN_INSTANTIATE(c10::BFloat16, c10::BFloat16)
FASTGEN_INSTANTIATE(c10::BFloat16, float)
#undef FASTGEN_INSTANTIATE

void linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
            const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "linear";
  check_linear_args(out, input, weight, bias);
  const int64_t m = input.size(0), k = input.size(1), n = weight.size(0);
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    const scalar_t* b = bias ? bias->data_ptr<scalar_t>() : nullptr;
    auto launch = [&](auto* out_ptr) {
      linear_launch(out_ptr, input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), b, m, n, k,
                    input.stride(0));
    };
    if (out.scalar_type() == input.scalar_type()) {
      launch(out.data_ptr<scalar_t>());
    } else {
      launch(out.data_ptr<float>());
    }
  });
}

}  // namespace fastgen::cpu
