// Linear (out = input @ weight^T + bias) on the CPU for few input rows: decode's GEMV / skinny
// GEMM, which reads every weight once per step and so runs at the speed the weight streams in.
// torch's bf16 path reaches ~13 GB/s there; this kernel is written for the stream:
//   - the weight rows are split over threads in contiguous runs (at::parallel_for over groups of
//     kRows rows), so every core streams its own part of the weight, front to back;
//   - each group of rows is one register tile (cpu/dot_tile.h: kRows weight rows x up to
//     kMaxInputs input rows, 4 x 6 with AVX-512, VDPBF16PS for bf16 where present), walked once
//     per kMaxInputs input rows, so the weight is read from memory once;
//   - N tails are tiles of one row.
// The fp32 sums get the bias (in fp32) and are rounded once, to T or to float32 (logits).
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cpu/dot_tile.h"
#include "cpu/linear.h"
#include "ops.h"

// GCC 12's AVX-512 reductions read an _mm*_undefined_* operand, which -Wuninitialized reports
// wherever they are inlined (GCC bug 105593, as in cpu/vec.h); the code here is clean.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace fastgen::cpu {

namespace {

using gemv::kMaxInputs;
using gemv::kRows;

// out[:, row : row + R] for every input row, MB input rows at a time. input is [m, k] with rows
// input_stride apart, or with gemv::kPacked<T>, gemv::pack_rows<MB>'s layout.
template <int R, int MB, typename T, typename OutT>
inline void rows_tile(OutT* out, const T* input, const T* weight, const T* bias, int64_t m,
                      int64_t n, int64_t k, int64_t input_stride, int64_t row) {
  const T* w = weight + row * k;
  // Where the weight stream is prefetched: kPrefetchExtra bytes past these rows.
  const char* ahead = reinterpret_cast<const char*>(w + R * k) + gemv::kPrefetchExtra;
  const int64_t passes = (m + MB - 1) / MB;
  float sums[MB][R];
  for (int64_t i0 = 0; i0 < m; i0 += MB) {
    const int64_t count = std::min<int64_t>(m - i0, MB);
    gemv::dot_rows<R, MB>(input, input_stride, i0, count, k, w, ahead, passes, sums);
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
  std::vector<T> packed;
  if constexpr (gemv::kPacked<T>) {
    if (m > 1) {
      packed.resize(m * gemv::packed_row_elems<T>(k));
      gemv::pack_rows<MB>(packed.data(), m, k, [&](int64_t i) { return input + i * input_stride; });
      input = packed.data();
    }
  }
  const int64_t groups = (n + R - 1) / R;
  const int64_t group_bytes = R * std::max<int64_t>(k, 1) * static_cast<int64_t>(sizeof(T));
  const int64_t grain = std::max<int64_t>(1, gemv::kMinBytesPerTask / group_bytes);
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
