// Paged KV cache writes on the GPU: one block per token, its threads striding over the token's
// [Hkv, D] key and value rows in 16-byte vectors when the rows allow (element by element
// otherwise). key / value may be row slices of the fused qkv tensor, so rows are addressed by
// their strides. A negative slot is padding and is skipped; so is a slot past the cache (a
// device kernel cannot raise; the CPU adapter rejects such slots).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cuda/cache.h"
#include "cuda/common.cuh"
#include "ops.h"

namespace fastgen::cuda {

namespace {

constexpr int kThreads = 128;

template <typename T, int N>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key,                 // [num_tokens, num_kv_heads, head_size]
                                         const T* __restrict__ value,               // [num_tokens, num_kv_heads, head_size]
                                         T* __restrict__ key_cache,                 // [num_slots, num_kv_heads, head_size]
                                         T* __restrict__ value_cache,               // [num_slots, num_kv_heads, head_size]
                                         const int64_t* __restrict__ slot_mapping,  // [num_tokens]
                                         int64_t num_slots, int64_t row, int64_t key_stride,
                                         int64_t value_stride) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0 || slot >= num_slots) return;
  const T* k = key + t * key_stride;
  const T* v = value + t * value_stride;
  T* k_out = key_cache + slot * row;
  T* v_out = value_cache + slot * row;
  for (int64_t i = threadIdx.x * N; i < row; i += blockDim.x * N) {
    Vec<T, N>::load(k + i).store(k_out + i);
    Vec<T, N>::load(v + i).store(v_out + i);
  }
}

}  // namespace

template <typename T>
cudaError_t reshape_and_cache_launch(const T* key, const T* value, T* key_cache, T* value_cache,
                                     const int64_t* slot_mapping, int64_t num_tokens,
                                     int64_t num_slots, int64_t num_kv_heads, int64_t head_size,
                                     int64_t key_stride, int64_t value_stride,
                                     cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  constexpr int N = kVec16<T>;
  const int64_t row = num_kv_heads * head_size;
  if (vec_aligned<N, T>(row, key_stride, {key, key_cache}) &&
      vec_aligned<N, T>(row, value_stride, {value, value_cache})) {
    reshape_and_cache_kernel<T, N><<<num_tokens, kThreads, 0, stream>>>(
        key, value, key_cache, value_cache, slot_mapping, num_slots, row, key_stride,
        value_stride);
  } else {
    reshape_and_cache_kernel<T, 1><<<num_tokens, kThreads, 0, stream>>>(
        key, value, key_cache, value_cache, slot_mapping, num_slots, row, key_stride,
        value_stride);
  }
  return cudaGetLastError();
}

#define FASTGEN_INSTANTIATE(T)                                                                \
  template cudaError_t reshape_and_cache_launch<T>(const T*, const T*, T*, T*, const int64_t*, \
                                                   int64_t, int64_t, int64_t, int64_t, int64_t, \
                                                   int64_t, cudaStream_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(__half)
FASTGEN_INSTANTIATE(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "reshape_and_cache";
  check_reshape_and_cache_args(key, value, key_cache, value_cache, slot_mapping);
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), head_size = key.size(2);
  const c10::cuda::CUDAGuard guard(key.device());
  FASTGEN_DISPATCH_FLOAT(key.scalar_type(), op, [&] {
    using T = cuda_type_t<scalar_t>;
    C10_CUDA_CHECK(reshape_and_cache_launch<T>(
        reinterpret_cast<const T*>(key.data_ptr()), reinterpret_cast<const T*>(value.data_ptr()),
        reinterpret_cast<T*>(key_cache.data_ptr()), reinterpret_cast<T*>(value_cache.data_ptr()),
        slot_mapping.data_ptr<int64_t>(), num_tokens, key_cache.size(0) * key_cache.size(1),
        num_kv_heads, head_size, key.stride(0), value.stride(0),
        c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace fastgen::cuda
