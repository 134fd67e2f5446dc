// Gated activations on the CPU: SiLU-and-multiply for the MLP of Llama-style models.
// Token rows are split across torch's thread pool only when each task gets enough elements to
// pay for the hand-off (decode batches of a few tokens run inline on the calling thread). The
// exp inside SiLU is a branch-free polynomial rather than std::exp, a libm call that keeps the
// compiler from vectorising the row loop (unless -ffast-math, which the numerics tests rule out).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/checks.h"
#include "core/dispatch.h"
#include "cpu/activation.h"
#include "ops.h"

namespace fastgen::cpu {

namespace {

// Below this many output elements per task, threading costs more than it saves.
constexpr int64_t kMinElementsPerTask = 16384;

// exp(x) in float32, within ~2 ulp on [-87, 88] (Cephes expf): x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by a polynomial, 2^n written into the exponent bits. Inputs are clamped to
// the range where 2^n is a normal float, so exp saturates instead of overflowing to inf.
inline float exp_vectorisable(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::nearbyint(x * 1.44269504088896341f);  // floor() would not vectorise
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t two_to_n = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(two_to_n);
}

}  // namespace

template <typename T>
void silu_and_mul_launch(T* out, const T* input, int64_t num_tokens, int64_t inter,
                         int64_t input_stride) {
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(inter, 1));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* gate = input + t * input_stride;
      const T* up = gate + inter;
      T* y = out + t * inter;
      for (int64_t i = 0; i < inter; ++i) {
        const float g = static_cast<float>(gate[i]);
        y[i] = static_cast<T>(g / (1.f + exp_vectorisable(-g)) * static_cast<float>(up[i]));
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
  FASTGEN_CHECK_DIM(op, input, 2);
  FASTGEN_CHECK_DIM(op, out, 2);
  FASTGEN_CHECK_CONTIGUOUS(op, out);
  TORCH_CHECK(input.stride(1) == 1, op, ": input rows must be contiguous");
  TORCH_CHECK(input.size(1) % 2 == 0, op, ": input must be [T, 2I], got odd last dim ",
              input.size(1));
  TORCH_CHECK(out.size(0) == input.size(0) && out.size(1) == input.size(1) / 2, op,
              ": out must be [", input.size(0), ", ", input.size(1) / 2, "], got ", out.sizes());
  FASTGEN_CHECK_SAME_DTYPE(op, out, input);
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    silu_and_mul_launch<scalar_t>(out.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                                  input.size(0), out.size(1), input.stride(0));
  });
}

}  // namespace fastgen::cpu
