// Device helpers shared by the CUDA kernels: dtype mapping from torch's types to CUDA's, float
// conversions, 16-byte vectors, and warp / block reductions.
#pragma once

#include <cstdint>
#include <initializer_list>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastgen::cuda {

// torch's storage type -> the CUDA type with the same bits.   cuda_type_t<at::BFloat16> is __nv_bfloat16.
template <typename T> struct cuda_type { using type = T; };
template <> struct cuda_type<c10::Half> { using type = __half; };
template <> struct cuda_type<c10::BFloat16> { using type = __nv_bfloat16; };
template <typename T> using cuda_type_t = typename cuda_type<T>::type;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N consecutive elements of T loaded or stored as one access: with 16 / sizeof(T) elements, one
// 128-bit instruction (LDG.E.128 / STG.E.128), the widest a thread can issue.   N = 1 is the
// scalar fallback for rows whose size or alignment does not allow wide accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
  __device__ __forceinline__ static Vec load(const T* p) { return *reinterpret_cast<const Vec*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Vec*>(p) = *this; }
  __device__ __forceinline__ float f(int i) const { return to_float(v[i]); }
};

template <typename T> constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));  // 8 bf16, 4 float

// Whether rows of `width` elements starting at `ptrs`, rows `stride` apart, allow N-wide accesses.
template <int N, typename T>
inline bool vec_aligned(int64_t width, int64_t stride, std::initializer_list<const T*> ptrs) {
  if (width % N != 0 || stride % N != 0) return false;
  for (const T* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) != 0) return false;
  }
  return true;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int num_warps = blockDim.x / 32;
  v = lane < num_warps ? partial[lane] : 0.f;
  return warp_sum(v);
}

}  // namespace fastgen::cuda
