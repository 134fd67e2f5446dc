// The CPU kernels' one SIMD layer: float32 vectors (Vec), int32 vectors (IVec) and lane masks
// (Mask), with loads / stores of every element type, exp and exp2, and, on AVX512-BF16, bf16 pair
// dot products. Every CPU kernel is written on it.
//
// Why: c10::BFloat16 / c10::Half conversions and std::exp are scalar code that -O3 does not
// vectorise, which left those kernels at a few GB/s. Here every element type is loaded as a
// vector of float32, the math is done in float32, and the result is rounded back exactly as c10
// rounds one element (bf16: round-to-nearest-even, NaN -> 0x7FC0; fp16: F16C round-to-nearest),
// so the vector kernels give bit-identical stores to a scalar loop with the same operation order.
// Lanes never mix except in reduce_add / reduce_max, so a kernel's per-lane results do not depend
// on the width.
//
// One width per build, picked at compile time from the flags (-march=native or not):
//   AVX-512 (F + BW + VL): 16 lanes, masked loads / stores for tails
//     + AVX512-BF16:        also the bf16 pair helpers (FASTGEN_VEC_AVX512_BF16, kHasBf16Pairs)
//   AVX2 + FMA + F16C:      8 lanes, tails through a small stack buffer
//   anything else:          1 lane of plain float (portable; FASTGEN_CPU_NATIVE=0 builds this
//                           unless the compiler's default target has AVX2)
//
// Usage (a row of n elements of T; kWidth lanes per Vec):
//   using namespace fastgen::cpu::vec;
//   int64_t i = 0;
//   for (; i + kWidth <= n; i += kWidth) store(y + i, load(x + i) * scale);
//   if (i < n) store(y + i, load(x + i, n - i) * scale, n - i);   // tail: 0 < count < kWidth
//   const Vec masked = select(load(first + i) <= set1_int(key), s, set1(-INFINITY));  // IVec, Mask
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FASTGEN_VEC_AVX512 1
#if defined(__AVX512BF16__)
#define FASTGEN_VEC_AVX512_BF16 1
#endif
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FASTGEN_VEC_AVX2 1
#include <immintrin.h>
#endif

// GCC 12 reports -Wmaybe-uninitialized inside its own AVX-512 intrinsics (the _mm*_undefined_*
// pass-through operand, GCC bug 105593) wherever they are inlined; the helpers here are clean. A
// file that calls intrinsics itself brackets its code with these two, as this header does.
#if defined(__GNUC__) && !defined(__clang__)
#define FASTGEN_INTRINSICS_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define FASTGEN_INTRINSICS_END _Pragma("GCC diagnostic pop")
#else
#define FASTGEN_INTRINSICS_BEGIN
#define FASTGEN_INTRINSICS_END
#endif

FASTGEN_INTRINSICS_BEGIN

namespace fastgen::cpu::vec {

// ---------------------------------------------------------------------------------------------
// Vec: kWidth float32 lanes, with + - * / and the helpers below.
// ---------------------------------------------------------------------------------------------
#if defined(FASTGEN_VEC_AVX512)
constexpr int64_t kWidth = 16;
struct Vec {
  __m512 v;
};
inline Vec set1(float x) { return {_mm512_set1_ps(x)}; }
inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
// a * b + c with one rounding.
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
// Sum of the lanes (the order is a tree, not left to right).
inline float reduce_add(Vec a) { return _mm512_reduce_add_ps(a.v); }
#elif defined(FASTGEN_VEC_AVX2)
constexpr int64_t kWidth = 8;
struct Vec {
  __m256 v;
};
inline Vec set1(float x) { return {_mm256_set1_ps(x)}; }
inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline float reduce_add(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
constexpr int64_t kWidth = 1;
struct Vec {
  float v;
};
inline Vec set1(float x) { return {x}; }
inline Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
inline Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
inline Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
inline Vec operator/(Vec a, Vec b) { return {a.v / b.v}; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return {std::fma(a.v, b.v, c.v)}; }
inline float reduce_add(Vec a) { return a.v; }
#endif

inline Vec zero() { return set1(0.f); }

// a * b + c, with one rounding where the target has FMA (AVX2, AVX-512: fmadd) and two elsewhere:
// for loops that only need the fastest multiply-add, since fmadd's exact std::fma is a libm call
// per lane on a portable x86-64 build.
#if defined(FASTGEN_VEC_AVX512) || defined(FASTGEN_VEC_AVX2)
inline Vec mul_add(Vec a, Vec b, Vec c) { return fmadd(a, b, c); }
#else
inline Vec mul_add(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
#endif

// ---------------------------------------------------------------------------------------------
// IVec: kWidth int32 lanes. Mask: one flag per lane, from a lane-wise comparison; select(m, a, b)
// takes a's lane where m is set and b's elsewhere. max, and reduce_max over the lanes.
// ---------------------------------------------------------------------------------------------
#if defined(FASTGEN_VEC_AVX512)
struct IVec {
  __m512i v;
};
struct Mask {
  __mmask16 m;
};
inline IVec set1_int(int32_t x) { return {_mm512_set1_epi32(x)}; }
// Lanes first, first + 1, ..., first + kWidth - 1.
inline IVec iota(int32_t first) {
  return {_mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                           _mm512_set1_epi32(first))};
}
inline Mask operator<(IVec a, IVec b) { return {_mm512_cmplt_epi32_mask(a.v, b.v)}; }
inline Mask operator<=(IVec a, IVec b) { return {_mm512_cmple_epi32_mask(a.v, b.v)}; }
inline Mask operator<(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
inline Mask operator==(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
inline Mask operator&(Mask a, Mask b) { return {static_cast<__mmask16>(a.m & b.m)}; }
inline Vec select(Mask m, Vec a, Vec b) { return {_mm512_mask_blend_ps(m.m, b.v, a.v)}; }
// a > b ? a : b lane-wise (so b where either is NaN).
inline Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float reduce_max(Vec a) { return _mm512_reduce_max_ps(a.v); }
#elif defined(FASTGEN_VEC_AVX2)
struct IVec {
  __m256i v;
};
struct Mask {
  __m256 m;  // all ones in a set lane, zeros elsewhere
};
inline IVec set1_int(int32_t x) { return {_mm256_set1_epi32(x)}; }
inline IVec iota(int32_t first) {
  return {_mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first))};
}
inline Mask operator<(IVec a, IVec b) { return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(b.v, a.v))}; }
inline Mask operator<=(IVec a, IVec b) {
  return {_mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpgt_epi32(a.v, b.v), _mm256_set1_epi32(-1)))};
}
inline Mask operator<(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline Mask operator==(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
inline Mask operator&(Mask a, Mask b) { return {_mm256_and_ps(a.m, b.m)}; }
inline Vec select(Mask m, Vec a, Vec b) { return {_mm256_blendv_ps(b.v, a.v, m.m)}; }
inline Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
inline float reduce_max(Vec a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
#else
struct IVec {
  int32_t v;
};
struct Mask {
  bool m;
};
inline IVec set1_int(int32_t x) { return {x}; }
inline IVec iota(int32_t first) { return {first}; }
inline Mask operator<(IVec a, IVec b) { return {a.v < b.v}; }
inline Mask operator<=(IVec a, IVec b) { return {a.v <= b.v}; }
inline Mask operator<(Vec a, Vec b) { return {a.v < b.v}; }
inline Mask operator==(Vec a, Vec b) { return {a.v == b.v}; }
inline Mask operator&(Mask a, Mask b) { return {a.m && b.m}; }
inline Vec select(Mask m, Vec a, Vec b) { return m.m ? a : b; }
inline Vec max(Vec a, Vec b) { return a.v > b.v ? a : b; }
inline float reduce_max(Vec a) { return a.v; }
#endif

// ---------------------------------------------------------------------------------------------
// Loads and stores. load(p) / store(p, v) move kWidth elements; load(p, count) / store(p, v,
// count) move the first 0 < count < kWidth (lanes past count load as 0 and are not written).
// load(const int32_t*) gives an IVec, every other element type a Vec.
// ---------------------------------------------------------------------------------------------
#if defined(FASTGEN_VEC_AVX512)
namespace detail {
inline __mmask16 first(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }
inline __m512 bf16_to_fp32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// c10::detail::round_to_nearest_even, lane-wise: add 0x7FFF plus the lowest kept bit, keep the
// high half; NaN becomes 0x7FC0. (VCVTNEPS2BF16 would be shorter but flushes denormals.)
inline __m256i fp32_to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
// Round-to-nearest-even, as c10::Half's constructor does (_cvtss_sh) when F16C is on.
constexpr int kFp16Rounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
}  // namespace detail

inline Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline IVec load(const int32_t* p) { return {_mm512_loadu_si512(p)}; }
inline Vec load(const float* p, int64_t count) {
  return {_mm512_maskz_loadu_ps(detail::first(count), p)};
}
inline Vec load(const c10::BFloat16* p) {
  return {detail::bf16_to_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline Vec load(const c10::BFloat16* p, int64_t count) {
  return {detail::bf16_to_fp32(_mm256_maskz_loadu_epi16(detail::first(count), p))};
}
inline Vec load(const c10::Half* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline Vec load(const c10::Half* p, int64_t count) {
  return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(detail::first(count), p))};
}

inline void store(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
inline void store(float* p, Vec a, int64_t count) {
  _mm512_mask_storeu_ps(p, detail::first(count), a.v);
}
inline void store(c10::BFloat16* p, Vec a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), detail::fp32_to_bf16(a.v));
}
inline void store(c10::BFloat16* p, Vec a, int64_t count) {
  _mm256_mask_storeu_epi16(p, detail::first(count), detail::fp32_to_bf16(a.v));
}
inline void store(c10::Half* p, Vec a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(a.v, detail::kFp16Rounding));
}
inline void store(c10::Half* p, Vec a, int64_t count) {
  _mm256_mask_storeu_epi16(p, detail::first(count), _mm512_cvtps_ph(a.v, detail::kFp16Rounding));
}

// The float32 value of a rounded to T (what store(T*) then load(T*) gives back).
template <typename T>
inline Vec round_to(Vec a) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return {detail::bf16_to_fp32(detail::fp32_to_bf16(a.v))};
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return {_mm512_cvtph_ps(_mm512_cvtps_ph(a.v, detail::kFp16Rounding))};
  } else {
    return a;
  }
}

#elif defined(FASTGEN_VEC_AVX2)
namespace detail {
inline __m256 bf16_to_fp32(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// See the AVX-512 version: c10's round-to-nearest-even, NaN -> 0x7FC0.
inline __m128i fp32_to_bf16(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), nan);
  const __m256i high = _mm256_srli_epi32(rounded, 16);  // each lane < 2^16: packus is exact
  return _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
}
constexpr int kFp16Rounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
// Tails go through a zero-filled buffer of kWidth elements.
template <typename T>
inline Vec load_partial(const T* p, int64_t count);
template <typename T>
inline void store_partial(T* p, Vec a, int64_t count);
}  // namespace detail

inline Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline IVec load(const int32_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))};
}
inline Vec load(const c10::BFloat16* p) {
  return {detail::bf16_to_fp32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline Vec load(const c10::Half* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void store(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
inline void store(c10::BFloat16* p, Vec a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), detail::fp32_to_bf16(a.v));
}
inline void store(c10::Half* p, Vec a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, detail::kFp16Rounding));
}

template <typename T>
inline Vec detail::load_partial(const T* p, int64_t count) {
  T buf[kWidth] = {};
  std::memcpy(buf, p, count * sizeof(T));
  return load(buf);
}
template <typename T>
inline void detail::store_partial(T* p, Vec a, int64_t count) {
  T buf[kWidth];
  store(buf, a);
  std::memcpy(p, buf, count * sizeof(T));
}
template <typename T>
inline Vec load(const T* p, int64_t count) {
  return detail::load_partial(p, count);
}
template <typename T>
inline void store(T* p, Vec a, int64_t count) {
  detail::store_partial(p, a, count);
}

template <typename T>
inline Vec round_to(Vec a) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return {detail::bf16_to_fp32(detail::fp32_to_bf16(a.v))};
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return {_mm256_cvtph_ps(_mm256_cvtps_ph(a.v, detail::kFp16Rounding))};
  } else {
    return a;
  }
}

#else
inline IVec load(const int32_t* p) { return {*p}; }
template <typename T>
inline Vec load(const T* p) {
  return {static_cast<float>(*p)};
}
template <typename T>
inline Vec load(const T* p, int64_t /*count, always 0 < count < 1: never called*/) {
  return load(p);
}
template <typename T>
inline void store(T* p, Vec a) {
  *p = static_cast<T>(a.v);
}
template <typename T>
inline void store(T* p, Vec a, int64_t /*count*/) {
  store(p, a);
}
template <typename T>
inline Vec round_to(Vec a) {
  return {static_cast<float>(static_cast<T>(a.v))};
}
#endif

// ---------------------------------------------------------------------------------------------
// exp(x), lane-wise, in float32 (Cephes expf): x = n ln2 + r with |r| <= ln2 / 2 and ln2 split
// in two (Cody-Waite), exp(r) by a degree-6 polynomial, then scaled by 2^n. Within 2 ulp for
// normal results; exp(x) = +inf for x > 88.72 (overflow), 0 below the denormal range, +inf and
// NaN propagate, exp(-inf) = 0. The scalar build calls std::exp.
// ---------------------------------------------------------------------------------------------
#if defined(FASTGEN_VEC_AVX512) || defined(FASTGEN_VEC_AVX2)
namespace detail {
// Clamp so that n stays in [-150, 128]: beyond, the result is 0 or inf anyway.
constexpr float kExpLo = -104.f;
constexpr float kExpHi = 89.f;
// exp(r) for |r| <= ln2 / 2.
inline Vec exp_poly(Vec r) {
  Vec p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  return fmadd(p, r * r, r + set1(1.f));
}
}  // namespace detail
#endif

#if defined(FASTGEN_VEC_AVX512)
inline Vec exp(Vec x) {
  // max / min return their second operand when either is NaN: NaN passes through the clamp.
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(detail::kExpHi),
                                  _mm512_max_ps(_mm512_set1_ps(detail::kExpLo), x.v));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  // scalef multiplies by 2^n with IEEE overflow to inf and gradual underflow to denormals / 0.
  return {_mm512_scalef_ps(detail::exp_poly({r}).v, n)};
}
#elif defined(FASTGEN_VEC_AVX2)
inline Vec exp(Vec x) {
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(detail::kExpHi),
                                  _mm256_max_ps(_mm256_set1_ps(detail::kExpLo), x.v));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 p = detail::exp_poly({r}).v;
  // 2^n in two factors 2^(n/2) and 2^(n - n/2), each a normal float for n in [-150, 128], so
  // large n overflows to inf and small n underflows gradually instead of wrapping the exponent.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  // NaN input: p is NaN, and NaN * s1 * s2 stays NaN.
  return {_mm256_mul_ps(_mm256_mul_ps(p, s1), s2)};
}
#else
inline Vec exp(Vec x) { return {std::exp(x.v)}; }
#endif

// ---------------------------------------------------------------------------------------------
// 2^x, lane-wise, in float32: Cephes' exp2f polynomial on [-0.5, 0.5] after taking out the nearest
// integer n (by the add-and-subtract-1.5*2^23 trick, exact for |x| < 2^22), scaled by 2^n through
// the exponent bits. Relative error ~1e-7. Lanes with x < -126 (-inf, a masked score, included)
// give exactly 0; x must be a number <= 127 (softmax weights 2^(s - max) have x <= 0).
// ---------------------------------------------------------------------------------------------
namespace detail {
// 2^n for an integer-valued n in [-126, 127].
#if defined(FASTGEN_VEC_AVX512)
inline Vec pow2_int(Vec n) {
  return {_mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n.v), _mm512_set1_epi32(127)), 23))};
}
#elif defined(FASTGEN_VEC_AVX2)
inline Vec pow2_int(Vec n) {
  return {_mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n.v), _mm256_set1_epi32(127)), 23))};
}
#else
inline Vec pow2_int(Vec n) {
  const int32_t bits = (static_cast<int32_t>(n.v) + 127) << 23;
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return {x};
}
#endif
}  // namespace detail

inline Vec exp2(Vec x) {
  const Mask underflow = x < set1(-126.f);
  const Vec clamped = select(underflow, set1(-126.f), x);
  const Vec n = (clamped + set1(12582912.f)) - set1(12582912.f);  // round to nearest
  const Vec f = clamped - n;                                       // in [-0.5, 0.5]
  Vec p = set1(1.535336188319500e-4f);
  p = mul_add(p, f, set1(1.339887440266574e-3f));
  p = mul_add(p, f, set1(9.618437357674640e-3f));
  p = mul_add(p, f, set1(5.550332471162809e-2f));
  p = mul_add(p, f, set1(2.402264791363012e-1f));
  p = mul_add(p, f, set1(6.931472028550421e-1f));
  p = mul_add(p, f, set1(1.f));
  return select(underflow, zero(), p * detail::pow2_int(n));
}

// ---------------------------------------------------------------------------------------------
// bf16 pairs (AVX512-BF16 builds only): a 32-bit lane holding two bf16, the first in its low
// half. VDPBF16PS (_mm512_dpbf16_ps(acc, a, b)) multiplies two pair vectors lane by lane and adds
// both products to acc's float32 lane: 32 multiply-adds an instruction, twice the float32 FMA.
// ---------------------------------------------------------------------------------------------
#if defined(FASTGEN_VEC_AVX512_BF16)
constexpr bool kHasBf16Pairs = true;

inline __m512bh as_bf16_pairs(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// a's lanes rounded to bf16 (to nearest even; VCVTNEPS2BF16 flushes denormals), and back.
inline __m256bh round_to_bf16(Vec a) { return _mm512_cvtneps_pbh(a.v); }
inline Vec to_float(__m256bh h) { return {detail::bf16_to_fp32(reinterpret_cast<const __m256i&>(h))}; }

// a and b rounded to bf16 and interleaved as pairs (a[i], b[i]).
inline __m512i pack_bf16_pairs(Vec a, Vec b) {
  const __m256bh ha = round_to_bf16(a), hb = round_to_bf16(b);
  return _mm512_or_si512(
      _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(ha)),
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(hb)), 16));
}

// The float32 values of a pair vector's first (low) / second (high) halves.
inline Vec low_half(__m512i pairs) { return {_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16))}; }
inline Vec high_half(__m512i pairs) {
  return {_mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(-65536)))};
}
#else
constexpr bool kHasBf16Pairs = false;
#endif

}  // namespace fastgen::cpu::vec

FASTGEN_INTRINSICS_END
