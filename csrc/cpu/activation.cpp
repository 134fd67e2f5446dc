// Gated activations on the CPU: SiLU-and-multiply for the MLP of Llama-style models.
// Token rows are split across torch's thread pool only when each task gets enough elements to
// pay for the hand-off (decode batches of a few tokens run inline on the calling thread). Rows
// are processed with the fp32 SIMD helpers of cpu/vec.h: bf16 / fp16 converted in registers, and
// the exp inside SiLU a vector polynomial (vec::exp) rather than std::exp, a libm call that
// would keep the loop scalar.
#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cpu/activation.h"
#include "cpu/vec.h"
#include "ops.h"

namespace fastgen::cpu {

namespace {

// Below this many output elements per task, threading costs more than it saves.
constexpr int64_t kMinElementsPerTask = 16384;

// silu(g) * u = g / (1 + exp(-g)) * u, lane-wise (g very negative: exp(-g) = inf, giving -0).
inline vec::Vec silu_mul(vec::Vec g, vec::Vec u) {
  return g / (vec::set1(1.f) + vec::exp(vec::set1(0.f) - g)) * u;
}

}  // namespace

template <typename T>
void silu_and_mul_launch(T* out, const T* input, int64_t num_tokens, int64_t inter,
                         int64_t input_stride) {
  using namespace vec;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(inter, 1));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* gate = input + t * input_stride;
      const T* up = gate + inter;
      T* y = out + t * inter;
      int64_t i = 0;
      // Two vectors per step: more independent work in flight for the long exp chain.
      for (; i + 2 * kWidth <= inter; i += 2 * kWidth) {
        const Vec y0 = silu_mul(load(gate + i), load(up + i));
        const Vec y1 = silu_mul(load(gate + i + kWidth), load(up + i + kWidth));
        store(y + i, y0);
        store(y + i + kWidth, y1);
      }
      for (; i + kWidth <= inter; i += kWidth) store(y + i, silu_mul(load(gate + i), load(up + i)));
      if (i < inter) {
        const int64_t n = inter - i;
        store(y + i, silu_mul(load(gate + i, n), load(up + i, n)), n);
      }
    }
  });
}

#define FASTGEN_INSTANTIATE(T) \
  template void silu_and_mul_launch<T>(T*, const T*, int64_t, int64_t, int64_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(c10::Half)
FASTGEN_INSTANTIATE(c10::BFloat16)
#undef FASTGEN_INSTANTIATE

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  constexpr const char* op = "silu_and_mul";
  check_silu_and_mul_args(out, input);
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    silu_and_mul_launch<scalar_t>(out.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                                  input.size(0), out.size(1), input.stride(0));
  });
}

}  // namespace fastgen::cpu
