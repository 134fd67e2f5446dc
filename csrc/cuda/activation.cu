// Gated activations on the GPU: SiLU-and-multiply, one block per token row, float32 math.
// (Vectorised 16-byte accesses come with the decode-path work; this version is plain and
// complete.)
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

template <typename T>
__global__ void silu_and_mul_kernel(T* __restrict__ out,          // [num_tokens, inter]
                                    const T* __restrict__ input,  // [num_tokens, 2 * inter]
                                    int64_t inter, int64_t input_stride) {
  const T* gate = input + blockIdx.x * input_stride;
  const T* up = gate + inter;
  T* y = out + blockIdx.x * inter;
  for (int64_t i = threadIdx.x; i < inter; i += blockDim.x) {
    const float g = to_float(gate[i]);
    y[i] = from_float<T>(g / (1.f + expf(-g)) * to_float(up[i]));
  }
}

}  // namespace

template <typename T>
cudaError_t silu_and_mul_launch(T* out, const T* input, int64_t num_tokens, int64_t inter,
                                int64_t input_stride, cudaStream_t stream) {
  if (num_tokens == 0 || inter == 0) return cudaSuccess;
  silu_and_mul_kernel<T><<<num_tokens, kThreads, 0, stream>>>(out, input, inter, input_stride);
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
