// The PTX wrappers behind the tensor-core kernels (sm_80+), in one place: cp.async copies into
// shared memory, ldmatrix fragment loads, mma.sync m16n8k16 with fp32 accumulators, and a
// swizzled shared-memory tile that keeps ldmatrix free of bank conflicts. (prefill_attention.cu
// predates this header and still has its own copies.)
//
//   Smem64<T>::chunk(base, row, c)            // 16-byte chunk c of a row of 64 elements
//   cp_async_16(dst, src, valid); cp_async_commit(); cp_async_wait_all();
//   ldmatrix_x4(a, Smem64<T>::chunk(s_a, row, c));
//   mma_16816<T>(acc, a, b0, b1);             // acc[4] += A (16x16, row) * B (16x8, col)
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastgen::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; valid = false writes zeros (and
// reads nothing, so gmem may then be any address).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators. T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// A shared-memory tile of rows of 64 16-bit elements (eight 16-byte chunks): row r's chunk c
// lives at chunk c ^ (r % 8), so ldmatrix's 8 row addresses hit 8 different bank groups.
template <typename T>
struct Smem64 {
  static constexpr int kCols = 64;
  static constexpr int kChunks = kCols / 8;
  __device__ __forceinline__ static T* chunk(T* base, int row, int c) {
    return base + row * kCols + ((c ^ (row % 8)) * 8);
  }
};

}  // namespace fastgen::cuda
