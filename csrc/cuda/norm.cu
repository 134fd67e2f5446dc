// RMSNorm on the GPU: one block per token row, float32 sums reduced across the block, one pass
// over memory. When the row allows 16-byte accesses, each thread loads up to kMaxVecs vectors of
// 16 bytes (8 bf16) into registers, so the normalised row is written from registers rather than
// read again; otherwise (odd hidden sizes, misaligned views) a scalar kernel strides the row.
// The fused variant writes the residual sum and the normalised row in the same kernel.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cuda/common.cuh"
#include "cuda/norm.h"
#include "ops.h"

namespace fastgen::cuda {

namespace {

constexpr int kScalarThreads = 256;
constexpr int kMaxThreads = 1024;
constexpr int kMaxVecs = 8;  // vectors per thread: rows up to 8 * 1024 * 8 = 65536 bf16 values

// out = x * inv_rms * w for the vectors a thread holds.
template <typename T, int N, int VECS>
__device__ __forceinline__ void store_normalised(T* __restrict__ y, const T* __restrict__ weight,
                                                 const float (&x)[VECS][N], float inv_rms,
                                                 int64_t num_vecs) {
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int64_t vec = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    if (vec < num_vecs) {
      const auto w = Vec<T, N>::load(weight + vec * N);
      Vec<T, N> out;
#pragma unroll
      for (int e = 0; e < N; ++e) out.v[e] = from_float<T>(x[i][e] * inv_rms * w.f(e));
      out.store(y + vec * N);
    }
  }
}

// Vectorised: thread t holds vectors t, t + blockDim.x, ... (VECS of them at most) in registers.
template <typename T, int VECS>
__global__ void rms_norm_vec_kernel(T* __restrict__ out,           // [num_tokens, hidden]
                                    const T* __restrict__ input,   // [num_tokens, hidden]
                                    const T* __restrict__ weight,  // [hidden]
                                    float epsilon, int64_t hidden, int64_t input_stride) {
  constexpr int N = kVec16<T>;
  const int64_t num_vecs = hidden / N;
  const T* x_row = input + blockIdx.x * input_stride;
  float x[VECS][N];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int64_t vec = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    const auto loaded = vec < num_vecs ? Vec<T, N>::load(x_row + vec * N) : Vec<T, N>{};
#pragma unroll
    for (int e = 0; e < N; ++e) {
      x[i][e] = vec < num_vecs ? loaded.f(e) : 0.f;
      sum_sq += x[i][e] * x[i][e];
    }
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / static_cast<float>(hidden) + epsilon);
  store_normalised<T, N, VECS>(out + blockIdx.x * hidden, weight, x, inv_rms, num_vecs);
}

template <typename T, int VECS>
__global__ void fused_add_rms_norm_vec_kernel(T* __restrict__ input,         // [num_tokens, hidden]
                                              T* __restrict__ residual,      // [num_tokens, hidden]
                                              const T* __restrict__ weight,  // [hidden]
                                              float epsilon, int64_t hidden) {
  constexpr int N = kVec16<T>;
  const int64_t num_vecs = hidden / N;
  T* x_row = input + blockIdx.x * hidden;
  T* r_row = residual + blockIdx.x * hidden;
  float s[VECS][N];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int64_t vec = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    if (vec < num_vecs) {
      const auto a = Vec<T, N>::load(x_row + vec * N);
      const auto b = Vec<T, N>::load(r_row + vec * N);
      Vec<T, N> sum;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        sum.v[e] = from_float<T>(a.f(e) + b.f(e));  // rounded as it is stored
        s[i][e] = to_float(sum.v[e]);
        sum_sq += s[i][e] * s[i][e];
      }
      sum.store(r_row + vec * N);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) s[i][e] = 0.f;
    }
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / static_cast<float>(hidden) + epsilon);
  store_normalised<T, N, VECS>(x_row, weight, s, inv_rms, num_vecs);
}

template <typename T>
__global__ void rms_norm_kernel(T* __restrict__ out,           // [num_tokens, hidden]
                                const T* __restrict__ input,   // [num_tokens, hidden]
                                const T* __restrict__ weight,  // [hidden]
                                float epsilon, int64_t hidden, int64_t input_stride) {
  const T* x = input + blockIdx.x * input_stride;
  T* y = out + blockIdx.x * hidden;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_float(x[i]);
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / static_cast<float>(hidden) + epsilon);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    y[i] = from_float<T>(to_float(x[i]) * inv_rms * to_float(weight[i]));
  }
}

template <typename T>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ input,         // [num_tokens, hidden]
                                          T* __restrict__ residual,      // [num_tokens, hidden]
                                          const T* __restrict__ weight,  // [hidden]
                                          float epsilon, int64_t hidden) {
  T* x = input + blockIdx.x * hidden;
  T* r = residual + blockIdx.x * hidden;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const T sum = from_float<T>(to_float(x[i]) + to_float(r[i]));  // rounded as it is stored
    r[i] = sum;
    const float v = to_float(sum);
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / static_cast<float>(hidden) + epsilon);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    x[i] = from_float<T>(to_float(r[i]) * inv_rms * to_float(weight[i]));
  }
}

// The vectorised launch shape for a row of num_vecs 16-byte vectors: the fewest vectors per
// thread (1, 2, 4 or 8) that fit the row in one block, and the threads that needs (a whole
// number of warps). vecs_per_thread = 0: the row is too long for registers.
struct VecShape {
  int vecs_per_thread = 0, threads = 0;
};
inline VecShape vec_shape(int64_t num_vecs) {
  for (int vecs = 1; vecs <= kMaxVecs; vecs *= 2) {
    const int64_t threads = (num_vecs + vecs - 1) / vecs;
    if (threads <= kMaxThreads) return {vecs, static_cast<int>((threads + 31) / 32 * 32)};
  }
  return {};
}

#define FASTGEN_DISPATCH_VECS(vecs, ...)                          \
  [&] {                                                           \
    switch (vecs) {                                               \
      case 1: { constexpr int VECS = 1; return __VA_ARGS__(); }   \
      case 2: { constexpr int VECS = 2; return __VA_ARGS__(); }   \
      case 4: { constexpr int VECS = 4; return __VA_ARGS__(); }   \
      default: { constexpr int VECS = 8; return __VA_ARGS__(); }  \
    }                                                             \
  }()

}  // namespace

template <typename T>
cudaError_t rms_norm_launch(T* out, const T* input, const T* weight, float epsilon,
                            int64_t num_tokens, int64_t hidden, int64_t input_stride,
                            cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  constexpr int N = kVec16<T>;
  const VecShape shape = vec_aligned<N, T>(hidden, input_stride, {out, input, weight})
                             ? vec_shape(hidden / N) : VecShape{};
  if (shape.vecs_per_thread == 0) {
    rms_norm_kernel<T><<<num_tokens, kScalarThreads, 0, stream>>>(out, input, weight, epsilon,
                                                                  hidden, input_stride);
  } else {
    FASTGEN_DISPATCH_VECS(shape.vecs_per_thread, [&] {
      rms_norm_vec_kernel<T, VECS><<<num_tokens, shape.threads, 0, stream>>>(
          out, input, weight, epsilon, hidden, input_stride);
    });
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t fused_add_rms_norm_launch(T* input, T* residual, const T* weight, float epsilon,
                                      int64_t num_tokens, int64_t hidden, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  constexpr int N = kVec16<T>;
  const VecShape shape = vec_aligned<N, T>(hidden, hidden, {input, residual, weight})
                             ? vec_shape(hidden / N) : VecShape{};
  if (shape.vecs_per_thread == 0) {
    fused_add_rms_norm_kernel<T><<<num_tokens, kScalarThreads, 0, stream>>>(
        input, residual, weight, epsilon, hidden);
  } else {
    FASTGEN_DISPATCH_VECS(shape.vecs_per_thread, [&] {
      fused_add_rms_norm_vec_kernel<T, VECS><<<num_tokens, shape.threads, 0, stream>>>(
          input, residual, weight, epsilon, hidden);
    });
  }
  return cudaGetLastError();
}

#define FASTGEN_INSTANTIATE(T)                                                                   \
  template cudaError_t rms_norm_launch<T>(T*, const T*, const T*, float, int64_t, int64_t,     \
                                          int64_t, cudaStream_t);                              \
  template cudaError_t fused_add_rms_norm_launch<T>(T*, T*, const T*, float, int64_t, int64_t, \
                                                    cudaStream_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(__half)
FASTGEN_INSTANTIATE(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  constexpr const char* op = "rms_norm";
  check_rms_norm_args(out, input, weight);
  const c10::cuda::CUDAGuard guard(input.device());
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    using T = cuda_type_t<scalar_t>;
    C10_CUDA_CHECK(rms_norm_launch<T>(
        reinterpret_cast<T*>(out.data_ptr()), reinterpret_cast<const T*>(input.data_ptr()),
        reinterpret_cast<const T*>(weight.data_ptr()), static_cast<float>(epsilon), input.size(0),
        input.size(1), input.stride(0), c10::cuda::getCurrentCUDAStream()));
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon) {
  constexpr const char* op = "fused_add_rms_norm";
  check_fused_add_rms_norm_args(input, residual, weight);
  const c10::cuda::CUDAGuard guard(input.device());
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), op, [&] {
    using T = cuda_type_t<scalar_t>;
    C10_CUDA_CHECK(fused_add_rms_norm_launch<T>(
        reinterpret_cast<T*>(input.data_ptr()), reinterpret_cast<T*>(residual.data_ptr()),
        reinterpret_cast<const T*>(weight.data_ptr()), static_cast<float>(epsilon), input.size(0),
        input.size(1), c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace fastgen::cuda
