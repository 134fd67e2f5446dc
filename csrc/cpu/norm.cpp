// RMSNorm on the CPU: one token row per task, float32 accumulation, the row loops written with
// the fp32 SIMD helpers of cpu/vec.h (bf16 / fp16 loads and rounding stores in registers), with a
// masked tail for hidden sizes that are not a multiple of the vector width. The fused variant
// adds the residual in the same pass, so the hidden state is read once and written twice instead
// of read three times.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cpu/norm.h"
#include "cpu/norm_row.h"
#include "cpu/vec.h"
#include "ops.h"

namespace fastgen::cpu {

using norm_row::inv_rms;
using norm_row::scale_row;
using norm_row::sum_squares;

template <typename T>
void rms_norm_launch(T* out, const T* input, const T* weight, float epsilon, int64_t num_tokens,
                     int64_t hidden, int64_t input_stride) {
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* x = input + t * input_stride;
      scale_row(out + t * hidden, x, weight, inv_rms(sum_squares(x, hidden), hidden, epsilon),
                hidden);
    }
  });
}

template <typename T>
void fused_add_rms_norm_launch(T* input, T* residual, const T* weight, float epsilon,
                               int64_t num_tokens, int64_t hidden) {
  using namespace vec;
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* x = input + t * hidden;
      T* r = residual + t * hidden;
      Vec acc = zero();
      int64_t i = 0;
      // The sum is rounded to T before it is squared: the residual stream is stored in T, and
      // the norm must see exactly what the next layer will add to.
      for (; i + kWidth <= hidden; i += kWidth) {
        const Vec sum = round_to<T>(load(x + i) + load(r + i));
        store(r + i, sum);
        acc = fmadd(sum, sum, acc);
      }
      if (i < hidden) {
        const int64_t n = hidden - i;
        const Vec sum = round_to<T>(load(x + i, n) + load(r + i, n));
        store(r + i, sum, n);
        acc = fmadd(sum, sum, acc);
      }
      scale_row(x, r, weight, inv_rms(reduce_add(acc), hidden, epsilon), hidden);
    }
  });
}

#define FASTGEN_INSTANTIATE(T)                                                                  \
  template void rms_norm_launch<T>(T*, const T*, const T*, float, int64_t, int64_t, int64_t); \
  template void fused_add_rms_norm_launch<T>(T*, T*, const T*, float, int64_t, int64_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(c10::Half)
FASTGEN_INSTANTIATE(c10::BFloat16)
#undef FASTGEN_INSTANTIATE

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  constexpr const char* op = "rms_norm";
  check_rms_norm_args(out, input, weight);
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    rms_norm_launch<scalar_t>(out.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                              weight.data_ptr<scalar_t>(), static_cast<float>(epsilon),
                              input.size(0), input.size(1), input.stride(0));
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon) {
  constexpr const char* op = "fused_add_rms_norm";
  check_fused_add_rms_norm_args(input, residual, weight);
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    fused_add_rms_norm_launch<scalar_t>(input.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                                        weight.data_ptr<scalar_t>(), static_cast<float>(epsilon),
                                        input.size(0), input.size(1));
  });
}

}  // namespace fastgen::cpu
