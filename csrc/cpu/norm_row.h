// The row operations of RMSNorm on the CPU, shared by the norm kernels (cpu/norm.cpp) and the
// rotary kernel's per-head q/k norm (cpu/rotary.cpp), so a norm fused into another kernel rounds
// bitwise as the rms_norm op does. float32 math through the SIMD helpers of cpu/vec.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/vec.h"

namespace fastgen::cpu::norm_row {

// sum(x[i]^2) over one row, in float32, with two accumulators so consecutive FMAs do not wait
// on each other.
template <typename T>
inline float sum_squares(const T* x, int64_t n) {
  using namespace vec;
  Vec acc0 = zero(), acc1 = zero();
  int64_t i = 0;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    const Vec v0 = load(x + i), v1 = load(x + i + kWidth);
    acc0 = fmadd(v0, v0, acc0);
    acc1 = fmadd(v1, v1, acc1);
  }
  for (; i + kWidth <= n; i += kWidth) {
    const Vec v = load(x + i);
    acc0 = fmadd(v, v, acc0);
  }
  if (i < n) {
    const Vec v = load(x + i, n - i);
    acc1 = fmadd(v, v, acc1);
  }
  return reduce_add(acc0 + acc1);
}

inline float inv_rms(float sum_sq, int64_t n, float epsilon) {
  return 1.f / std::sqrt(sum_sq / static_cast<float>(n) + epsilon);
}

// y = x * inv_rms * w over one row, rounded to T once. y may be x: each chunk is loaded before it
// is stored.
template <typename T>
inline void scale_row(T* y,        // [n]
                      const T* x,  // [n]
                      const T* w,  // [n]
                      float inv_rms, int64_t n) {
  using namespace vec;
  const Vec scale = set1(inv_rms);
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) store(y + i, load(x + i) * scale * load(w + i));
  if (i < n) store(y + i, load(x + i, n - i) * scale * load(w + i, n - i), n - i);
}

// RMSNorm of one row in place: x = x / sqrt(mean(x^2) + epsilon) * w.
template <typename T>
inline void normalize(T* x, const T* w, float epsilon, int64_t n) {
  scale_row(x, x, w, inv_rms(sum_squares(x, n), n, epsilon), n);
}

}  // namespace fastgen::cpu::norm_row
