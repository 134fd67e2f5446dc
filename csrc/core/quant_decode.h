// Reading one code and one (scale, offset) pair out of core/quant_format.h's chunks, on the host
// and on the device: the CPU's portable kernel and dequantizer and the CUDA kernels share these.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>
#include <c10/util/Half.h>

#include "core/quant_format.h"

namespace fastgen::quant {

C10_HOST_DEVICE inline float half_at(const uint8_t* p, int index) {
  const uint16_t bits = static_cast<uint16_t>(p[2 * index] | (p[2 * index + 1] << 8));
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Bit `bit` of the little-endian uint64 mask at p.
C10_HOST_DEVICE inline int mask_bit(const uint8_t* p, int bit) {
  return (p[bit >> 3] >> (bit & 7)) & 1;
}

// The code of tile row r, chunk element e (0 .. super_elems - 1).
template <QType Q>
C10_HOST_DEVICE inline int code_at(const uint8_t* chunk, int r, int e) {
  constexpr Format F = format_of(Q);
  const int v = e / F.elems_per_vector(), j = e % F.elems_per_vector();
  if constexpr (F.code_bits == 8) {
    return chunk[v * kVectorBytes + 4 * r + j];
  } else {
    const int lane = 4 * r + (j & 3);
    const int high = j >= 4;
    const uint8_t byte = chunk[v * kVectorBytes + lane];
    int code = high ? byte >> 4 : byte & 15;
    if constexpr (F.code_bits >= 5) {
      const uint8_t* planes = chunk + F.vectors * kVectorBytes + v * F.mask_planes() * 16;
      if constexpr (F.code_bits == 5) {
        code += mask_bit(planes + 8 * high, lane) << 4;
      } else {
        code += mask_bit(planes + 16 * high, lane) << 4;
        code += mask_bit(planes + 16 * high + 8, lane) << 5;
      }
    }
    return code;
  }
}

// (s, o) of tile row r, group g of a chunk: weight = s * code + o.
template <QType Q>
C10_HOST_DEVICE inline void scale_at(const uint8_t* chunk, int r, int g, float& s, float& o) {
  constexpr Format F = format_of(Q);
  const uint8_t* sc = chunk + scales_offset(F);
  if constexpr (Q == QType::Q4_0) {
    s = half_at(sc, r), o = s * -8.f;
  } else if constexpr (Q == QType::Q4_1) {
    s = half_at(sc, r), o = half_at(sc + 32, r);
  } else if constexpr (Q == QType::Q8_0) {
    s = half_at(sc, r), o = s * -128.f;
  } else if constexpr (Q == QType::Q4_K || Q == QType::Q5_K) {
    const float d = half_at(sc + 256, r), dmin = half_at(sc + 288, r);
    s = d * static_cast<float>(sc[g * 16 + r]);
    o = -dmin * static_cast<float>(sc[128 + g * 16 + r]);
  } else {  // Q6_K
    s = half_at(sc + 256, r) * static_cast<float>(static_cast<int8_t>(sc[g * 16 + r]));
    o = s * -32.f;
  }
}

// One weight as gguf.quants.dequantize computes it: d * (q - 8), d * q + m, d * q,
// (d sc) * q - dmin m, (d sc) * (q - 32); each is s * code + o in exact arithmetic.
template <QType Q>
C10_HOST_DEVICE inline float weight_value(float s, float o, int code) {
  if constexpr (Q == QType::Q4_0) return s * static_cast<float>(code - 8);
  if constexpr (Q == QType::Q8_0) return s * static_cast<float>(code - 128);
  if constexpr (Q == QType::Q6_K) return s * static_cast<float>(code - 32);
  return s * static_cast<float>(code) + o;
}

}  // namespace fastgen::quant

// Turns a runtime QType into the constexpr Q for a templated body.
#define FASTGEN_DISPATCH_QTYPE(qtype, ...)                                                                 \
  [&] {                                                                                                    \
    switch (qtype) {                                                                                       \
      case ::fastgen::quant::QType::Q4_0: { constexpr auto Q = ::fastgen::quant::QType::Q4_0; return __VA_ARGS__(); } \
      case ::fastgen::quant::QType::Q4_1: { constexpr auto Q = ::fastgen::quant::QType::Q4_1; return __VA_ARGS__(); } \
      case ::fastgen::quant::QType::Q8_0: { constexpr auto Q = ::fastgen::quant::QType::Q8_0; return __VA_ARGS__(); } \
      case ::fastgen::quant::QType::Q4_K: { constexpr auto Q = ::fastgen::quant::QType::Q4_K; return __VA_ARGS__(); } \
      case ::fastgen::quant::QType::Q5_K: { constexpr auto Q = ::fastgen::quant::QType::Q5_K; return __VA_ARGS__(); } \
      case ::fastgen::quant::QType::Q6_K: { constexpr auto Q = ::fastgen::quant::QType::Q6_K; return __VA_ARGS__(); } \
    }                                                                                                      \
  }()
