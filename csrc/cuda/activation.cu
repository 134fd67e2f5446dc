// Gated activations on the GPU: SiLU-and-multiply, float32 math, one pass over memory. The grid is
// (token rows, slices of a row): each thread handles one N-element vector of gate and up, read
// and written with 16-byte accesses when the row's size and alignment allow (N = 8 for bf16),
// element by element otherwise.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cuda/activation.h"
#include "cuda/common.cuh"
#include "ops.h"

namespace fastgen::cuda {

namespace {

constexpr int kThreads = 256;

template <typename T, int N>
__global__ void silu_and_mul_kernel(T* __restrict__ out,          // [num_tokens, inter]
                                    const T* __restrict__ input,  // [num_tokens, 2 * inter]
                                    int64_t inter, int64_t input_stride) {
  const int64_t i = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * N;
  if (i >= inter) return;
  const T* gate = input + blockIdx.x * input_stride;
  const auto g = Vec<T, N>::load(gate + i);
  const auto u = Vec<T, N>::load(gate + inter + i);
  Vec<T, N> y;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const float x = g.f(e);
    y.v[e] = from_float<T>(x / (1.f + expf(-x)) * u.f(e));
  }
  y.store(out + blockIdx.x * inter + i);
}

template <typename T, int N>
void launch(T* out, const T* input, int64_t num_tokens, int64_t inter, int64_t input_stride,
            cudaStream_t stream) {
  const int64_t slices = (inter / N + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(slices));
  silu_and_mul_kernel<T, N><<<grid, kThreads, 0, stream>>>(out, input, inter, input_stride);
}

}  // namespace

template <typename T>
cudaError_t silu_and_mul_launch(T* out, const T* input, int64_t num_tokens, int64_t inter,
                                int64_t input_stride, cudaStream_t stream) {
  if (num_tokens == 0 || inter == 0) return cudaSuccess;
  constexpr int N = kVec16<T>;
  // up starts `inter` elements into the row, so inter itself must be a whole number of vectors.
  if (vec_aligned<N, T>(inter, input_stride, {out, input})) {
    launch<T, N>(out, input, num_tokens, inter, input_stride, stream);
  } else {
    launch<T, 1>(out, input, num_tokens, inter, input_stride, stream);
  }
  return cudaGetLastError();
}

#define FASTGEN_INSTANTIATE(T)                                                         \
  template cudaError_t silu_and_mul_launch<T>(T*, const T*, int64_t, int64_t, int64_t, \
                                              cudaStream_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(__half)
FASTGEN_INSTANTIATE(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  constexpr const char* op = "silu_and_mul";
  check_silu_and_mul_args(out, input);
  const c10::cuda::CUDAGuard guard(input.device());
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    using T = cuda_type_t<scalar_t>;
    C10_CUDA_CHECK(silu_and_mul_launch<T>(
        reinterpret_cast<T*>(out.data_ptr()), reinterpret_cast<const T*>(input.data_ptr()),
        input.size(0), out.size(1), input.stride(0), c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace fastgen::cuda
