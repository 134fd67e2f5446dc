// Linear (out = input @ weight^T + bias) on the CPU for few input rows: decode's GEMV / skinny
// GEMM, which reads every weight once per step and so runs at the speed the weight streams in.
// torch's bf16 path reaches ~13 GB/s there; this kernel is written for the stream:
//   - the weight rows are split over threads in contiguous runs (at::parallel_for over groups of
//     kRows rows), so every core streams its own part of the weight, front to back;
//   - a tile is kRows weight rows x up to kMaxInputs input rows, with one fp32 accumulator vector
//     each (16 registers at most), walked along K one vector at a time; with more input rows the
//     same kRows rows are walked again, from L1 / L2, so the weight is read from memory once;
//   - bf16 with AVX512-BF16 (VDPBF16PS): 32 products per instruction, each pair summed into fp32;
//     every other type / machine loads both operands as fp32 (cpu/vec.h) and uses FMA;
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

constexpr int kRows = 4;       // weight rows per tile
constexpr int kMaxInputs = 4;  // input rows per tile
// Work below this many weight bytes stays on one thread (a fork costs a few microseconds).
constexpr int64_t kMinBytesPerTask = 64 << 10;

using Sums = float[kMaxInputs][kRows];

// Fully unrolls the loops over a tile's rows. GCC otherwise keeps the accumulator arrays in memory
// and stores all of them on every step along K (measured: ~3x slower at 4 input rows).
#define FASTGEN_UNROLL _Pragma("GCC unroll 16")

// Weight bytes to prefetch ahead of the group of kRows rows being read. The hardware prefetcher
// follows long rows well but not kRows interleaved short ones (K = 576: 1152-byte rows), so each
// step along K also prefetches as many bytes as it reads, this far ahead in the linear stream.
constexpr int64_t kPrefetchExtra = 8192;

// Prefetches kBytes bytes (a multiple of 64) from p into L1; past the weight's end it is a no-op.
template <int64_t kBytes>
inline void prefetch(const char* p) {
  for (int64_t b = 0; b < kBytes; b += 64) __builtin_prefetch(p + b);
}

#if defined(FASTGEN_LINEAR_DPBF16)
// sums[i][r] = dot(x row i, w row r) for MB input rows and R weight rows, 32 bf16 per step.
template <int MB, int R>
inline void dot_tile_dpbf16(const c10::BFloat16* x,  // [MB, k], rows x_stride apart
                            int64_t x_stride,
                            const c10::BFloat16* w,  // [R, k]
                            int64_t k, const char* ahead, Sums& sums) {
  __m512 acc[MB][R];
  FASTGEN_UNROLL
  for (int i = 0; i < MB; ++i)
    FASTGEN_UNROLL
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  // One loop for the body and the tail: the last step's mask keeps the k - j < 32 elements left,
  // and the zeros loaded past them add nothing.
  for (int64_t j = 0; j < k; j += 32) {
    const __mmask32 mask = k - j >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (k - j)) - 1u);
    if (ahead) prefetch<R * 64>(ahead + j * R * 2);
    __m512bh wv[R];
    FASTGEN_UNROLL
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * k + j);
    FASTGEN_UNROLL
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * x_stride + j);
      FASTGEN_UNROLL
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
    }
  }
  FASTGEN_UNROLL
  for (int i = 0; i < MB; ++i)
    FASTGEN_UNROLL
    for (int r = 0; r < R; ++r) sums[i][r] = vec::reduce_add({acc[i][r]});
}
#endif

// The same tile in fp32 through cpu/vec.h: both operands loaded as fp32, one FMA per lane.
template <int MB, int R, typename T>
inline void dot_tile(const T* x,  // [MB, k], rows x_stride apart
                     int64_t x_stride,
                     const T* w,  // [R, k]
                     int64_t k, const char* ahead, Sums& sums) {
#if defined(FASTGEN_LINEAR_DPBF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) return dot_tile_dpbf16<MB, R>(x, x_stride, w, k, ahead, sums);
#endif
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

// out[:, row : row + R] for every input row, kMaxInputs input rows at a time.
template <int R, typename T, typename OutT>
inline void rows_tile(OutT* out, const T* input, const T* weight, const T* bias, int64_t m,
                      int64_t n, int64_t k, int64_t input_stride, int64_t row) {
  const T* w = weight + row * k;
  // Only the first pass over these rows reads them from memory.
  const char* ahead = reinterpret_cast<const char*>(w + R * k) + kPrefetchExtra;
  Sums sums;
  for (int64_t i0 = 0; i0 < m; i0 += kMaxInputs, ahead = nullptr) {
    const T* x = input + i0 * input_stride;
    const int64_t count = std::min<int64_t>(m - i0, kMaxInputs);
    switch (count) {
      case 4: dot_tile<4, R>(x, input_stride, w, k, ahead, sums); break;
      case 3: dot_tile<3, R>(x, input_stride, w, k, ahead, sums); break;
      case 2: dot_tile<2, R>(x, input_stride, w, k, ahead, sums); break;
      default: dot_tile<1, R>(x, input_stride, w, k, ahead, sums); break;
    }
    for (int64_t i = 0; i < count; ++i)
      FASTGEN_UNROLL
      for (int r = 0; r < R; ++r) {
        const float b = bias ? static_cast<float>(bias[row + r]) : 0.f;
        out[(i0 + i) * n + row + r] = static_cast<OutT>(sums[i][r] + b);
      }
  }
}

}  // namespace

template <typename T, typename OutT>
void linear_launch(OutT* out, const T* input, const T* weight, const T* bias, int64_t m, int64_t n,
                   int64_t k, int64_t input_stride) {
  if (m == 0 || n == 0) return;
  const int64_t groups = (n + kRows - 1) / kRows;
  const int64_t group_bytes = kRows * std::max<int64_t>(k, 1) * static_cast<int64_t>(sizeof(T));
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / group_bytes);
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    const int64_t row_end = std::min(end * kRows, n);
    int64_t row = begin * kRows;
    for (; row + kRows <= row_end; row += kRows)
      rows_tile<kRows>(out, input, weight, bias, m, n, k, input_stride, row);
    for (; row < row_end; ++row) rows_tile<1>(out, input, weight, bias, m, n, k, input_stride, row);
  });
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
