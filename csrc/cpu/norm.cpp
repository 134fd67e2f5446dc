// RMSNorm on the CPU: one token row per task, float32 accumulation, loops written so that
// -O3 -march=native vectorises them. The fused variant adds the residual in the same pass, so
// the hidden state is read once and written twice instead of read three times.
#include <cmath>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/checks.h"
#include "core/dispatch.h"
#include "cpu/norm.h"
#include "ops.h"

namespace fastgen::cpu {

template <typename T>
void rms_norm_launch(T* out, const T* input, const T* weight, float epsilon, int64_t num_tokens,
                     int64_t hidden, int64_t input_stride) {
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* x = input + t * input_stride;
      T* y = out + t * hidden;
      float sum_sq = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        const float v = static_cast<float>(x[i]);
        sum_sq += v * v;
      }
      const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(hidden) + epsilon);
      for (int64_t i = 0; i < hidden; ++i) {
        y[i] = static_cast<T>(static_cast<float>(x[i]) * inv_rms * static_cast<float>(weight[i]));
      }
    }
  });
}

template <typename T>
void fused_add_rms_norm_launch(T* input, T* residual, const T* weight, float epsilon,
                               int64_t num_tokens, int64_t hidden) {
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* x = input + t * hidden;
      T* r = residual + t * hidden;
      float sum_sq = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        // The sum is rounded to T before it is squared: the residual stream is stored in T, and
        // the norm must see exactly what the next layer will add to.
        const T sum = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(r[i]));
        r[i] = sum;
        const float v = static_cast<float>(sum);
        sum_sq += v * v;
      }
      const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(hidden) + epsilon);
      for (int64_t i = 0; i < hidden; ++i) {
        x[i] = static_cast<T>(static_cast<float>(r[i]) * inv_rms * static_cast<float>(weight[i]));
      }
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
  FASTGEN_CHECK_DIM(op, input, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, out);
  FASTGEN_CHECK_CONTIGUOUS(op, weight);
  TORCH_CHECK(input.stride(1) == 1, op, ": input rows must be contiguous");
  TORCH_CHECK(out.sizes() == input.sizes(), op, ": out shape ", out.sizes(), " != input shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == input.size(1), op, ": weight must be [",
              input.size(1), "], got ", weight.sizes());
  FASTGEN_CHECK_SAME_DTYPE(op, out, input);
  FASTGEN_CHECK_SAME_DTYPE(op, weight, input);
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    rms_norm_launch<scalar_t>(out.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                              weight.data_ptr<scalar_t>(), static_cast<float>(epsilon),
                              input.size(0), input.size(1), input.stride(0));
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon) {
  constexpr const char* op = "fused_add_rms_norm";
  FASTGEN_CHECK_DIM(op, input, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, input);
  FASTGEN_CHECK_CONTIGUOUS(op, residual);
  FASTGEN_CHECK_CONTIGUOUS(op, weight);
  TORCH_CHECK(residual.sizes() == input.sizes(), op, ": residual shape ", residual.sizes(),
              " != input shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == input.size(1), op, ": weight must be [",
              input.size(1), "], got ", weight.sizes());
  FASTGEN_CHECK_SAME_DTYPE(op, residual, input);
  FASTGEN_CHECK_SAME_DTYPE(op, weight, input);
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    fused_add_rms_norm_launch<scalar_t>(input.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                                        weight.data_ptr<scalar_t>(), static_cast<float>(epsilon),
                                        input.size(0), input.size(1));
  });
}

}  // namespace fastgen::cpu
