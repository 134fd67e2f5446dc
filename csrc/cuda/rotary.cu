// Rotary position embedding on the GPU, in place on query and key: one block per token, its
// threads striding over the (head, pair) work items of the query heads, then the key heads; the
// token's cos / sin row is read from the float32 cache. query and key may be column slices of
// one fused qkv tensor, so rows are addressed through their own strides. Positions are trusted
// here (a device kernel cannot raise); the CPU adapter checks them.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cuda/common.cuh"
#include "cuda/rotary.h"
#include "ops.h"

namespace fastgen::cuda {

namespace {

constexpr int kThreads = 256;

// Rotates the first 2 * half dims of each of num_heads heads of one token row.
template <typename T, bool IS_NEOX>
__device__ __forceinline__ void rotate_heads(T* __restrict__ x,              // [num_heads, head_size]
                                             const float* __restrict__ cos,  // [half]
                                             const float* __restrict__ sin,  // [half]
                                             int64_t num_heads, int64_t head_size, int64_t half) {
  for (int64_t item = threadIdx.x; item < num_heads * half; item += blockDim.x) {
    const int64_t h = item / half, i = item % half;
    const int64_t a = IS_NEOX ? i : 2 * i;
    const int64_t b = IS_NEOX ? i + half : 2 * i + 1;
    T* head = x + h * head_size;
    const float xa = to_float(head[a]), xb = to_float(head[b]);
    const float c = cos[i], s = sin[i];
    head[a] = from_float<T>(xa * c - xb * s);
    head[b] = from_float<T>(xb * c + xa * s);
  }
}

template <typename T, bool IS_NEOX>
__global__ void rotary_embedding_kernel(const int64_t* __restrict__ positions,    // [num_tokens]
                                        T* __restrict__ query,                    // [num_tokens, num_heads * head_size]
                                        T* __restrict__ key,                      // [num_tokens, num_kv_heads * head_size]
                                        const float* __restrict__ cos_sin_cache,  // [max_position, rot_dim]
                                        int64_t num_heads, int64_t num_kv_heads,
                                        int64_t head_size, int64_t rot_dim, int64_t query_stride,
                                        int64_t key_stride) {
  const int64_t t = blockIdx.x;
  const int64_t half = rot_dim / 2;
  const float* cos = cos_sin_cache + positions[t] * rot_dim;
  const float* sin = cos + half;
  rotate_heads<T, IS_NEOX>(query + t * query_stride, cos, sin, num_heads, head_size, half);
  rotate_heads<T, IS_NEOX>(key + t * key_stride, cos, sin, num_kv_heads, head_size, half);
}

}  // namespace

template <typename T>
cudaError_t rotary_embedding_launch(const int64_t* positions, T* query, T* key,
                                    const float* cos_sin_cache, int64_t num_tokens,
                                    int64_t num_heads, int64_t num_kv_heads, int64_t head_size,
                                    int64_t rot_dim, int64_t query_stride, int64_t key_stride,
                                    bool is_neox, cudaStream_t stream) {
  if (num_tokens == 0 || rot_dim == 0) return cudaSuccess;
  FASTGEN_DISPATCH_BOOL(is_neox, IS_NEOX, [&] {
    rotary_embedding_kernel<T, IS_NEOX><<<num_tokens, kThreads, 0, stream>>>(
        positions, query, key, cos_sin_cache, num_heads, num_kv_heads, head_size, rot_dim,
        query_stride, key_stride);
  });
  return cudaGetLastError();
}

#define FASTGEN_INSTANTIATE(T)                                                                \
  template cudaError_t rotary_embedding_launch<T>(const int64_t*, T*, T*, const float*,      \
                                                  int64_t, int64_t, int64_t, int64_t, int64_t, \
                                                  int64_t, int64_t, bool, cudaStream_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(__half)
FASTGEN_INSTANTIATE(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox) {
  constexpr const char* op = "rotary_embedding";
  check_rotary_embedding_args(positions, query, key, head_size, cos_sin_cache);
  const int64_t num_tokens = positions.size(0), rot_dim = cos_sin_cache.size(1);
  const c10::cuda::CUDAGuard guard(query.device());
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    using T = cuda_type_t<scalar_t>;
    C10_CUDA_CHECK(rotary_embedding_launch<T>(
        positions.data_ptr<int64_t>(), reinterpret_cast<T*>(query.data_ptr()),
        reinterpret_cast<T*>(key.data_ptr()), cos_sin_cache.data_ptr<float>(), num_tokens,
        query.size(1) / head_size, key.size(1) / head_size, head_size, rot_dim, query.stride(0),
        key.stride(0), is_neox, c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace fastgen::cuda
