// fastgen's layout for block-quantized weights: GGUF's Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K
// (and int8 per output channel, stored as Q8_0), repacked once at load time, losslessly, from
// llama.cpp's row-major blocks into tiles that the CPU and CUDA kernels stream front to back.
// python/fastgen/quantization/formats.py builds it; the kernels read it; the byte counts below
// are the contract between the two (the ops check a packed tensor's shape against them).
//
// A weight [N, K] (N output rows, K input features; K a multiple of the type's super-block) is
// cut into tiles of kTileRows = 16 rows (N padded with zero rows), and each tile's K into chunks
// of one super-block (32 elements, or 256 for the K-quants): packed is uint8
// [ceil(N / 16), K / super_elems, chunk_bytes]. A chunk is
//
//   [ quant vectors | high-bit masks (Q5_K, Q6_K) | scales ]
//
// Quant vectors are 64 bytes: byte b = 4 r + j belongs to tile row r (0..15), so a vector is one
// 32-bit lane per row, the shape VPDPBUSD multiplies against a broadcast 4-byte activation.
//   - 4-bit codes (Q4_*, and the low 4 bits of Q5_K / Q6_K): vector v holds chunk elements
//     8v .. 8v + 7 of every row: byte (r, j)'s low nibble is element 8v + j, its high nibble
//     element 8v + 4 + j. SB / 8 vectors per chunk.
//   - 8-bit codes (Q8_0): vector v holds elements 4v + j as the unsigned byte q + 128.
//     SB / 4 vectors.
//   - Q5_K: per vector two uint64 masks, bit b = bit 4 of the low / high nibble's element of
//     byte b (16 bytes per vector). Q6_K: four, bits 4 and 5 of the low nibble's element, then
//     of the high nibble's (32 bytes per vector).
// Scales (fp16 as stored in the file, so nothing is rounded; 16 rows each, tile row order):
//   Q4_0, Q8_0: d[16]                     Q4_1: d[16], m[16]
//   Q4_K, Q5_K: sc[8][16] u8, m[8][16] u8 (6-bit, unpacked), d[16], dmin[16]
//   Q6_K:       sc[16][16] i8, d[16]
//
// Every type is the same sum over groups of G elements (32, or 16 for Q6_K) with a scale s and an
// offset o per (row, group): weight = s * code + o, so with activations quantized per 32 to int8
// (x = dx * qx; the CPU kernel adds a second digit, cpu/quant.h) a row's dot product is
//   sum over groups g of  dx_g * (s * idot_g + o * isx_g),  idot_g = sum code * qx,  isx_g = sum qx,
// where (s, o) is (d, -8 d) for Q4_0, (d, m) for Q4_1, (d, -128 d) for Q8_0 (codes are q + 128),
// (d sc, -dmin m) for Q4_K / Q5_K and (d sc, -32 d sc) for Q6_K (codes are GGUF's q, 0..63).
#pragma once

#include <cstdint>

namespace fastgen::quant {

constexpr int kTileRows = 16;
constexpr int kVectorBytes = 64;  // one code vector: 16 rows x 4 bytes
constexpr int kActBlock = 32;     // activations are quantized per 32 elements

// GGML's type ids, as GGUF files store them.
enum class QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

struct Format {
  int super_elems;   // K elements per chunk
  int group_elems;   // elements per (scale, offset) group
  int code_bits;     // 4, 5, 6 or 8
  int vectors;       // code vectors per chunk
  int mask_bytes;    // high-bit mask bytes per chunk
  int scale_bytes;   // scale bytes per chunk
  constexpr int elems_per_vector() const { return code_bits == 8 ? 4 : 8; }
  constexpr int mask_planes() const { return code_bits == 5 ? 1 : code_bits == 6 ? 2 : 0; }
  constexpr int groups() const { return super_elems / group_elems; }
  constexpr int vectors_per_group() const { return group_elems / elems_per_vector(); }
  constexpr int chunk_bytes() const { return vectors * kVectorBytes + mask_bytes + scale_bytes; }
};

constexpr Format format_of(QType q) {
  switch (q) {
    case QType::Q4_0: return {32, 32, 4, 4, 0, 32};
    case QType::Q4_1: return {32, 32, 4, 4, 0, 64};
    case QType::Q8_0: return {32, 32, 8, 8, 0, 32};
    case QType::Q4_K: return {256, 32, 4, 32, 0, 320};
    case QType::Q5_K: return {256, 32, 5, 32, 32 * 16, 320};
    case QType::Q6_K: return {256, 16, 6, 32, 32 * 32, 288};
  }
  return {0, 0, 0, 0, 0, 0};
}

constexpr bool is_supported(int64_t q) {
  return q == 2 || q == 3 || q == 8 || q == 12 || q == 13 || q == 14;
}

constexpr const char* name_of(QType q) {
  switch (q) {
    case QType::Q4_0: return "Q4_0";
    case QType::Q4_1: return "Q4_1";
    case QType::Q8_0: return "Q8_0";
    case QType::Q4_K: return "Q4_K";
    case QType::Q5_K: return "Q5_K";
    case QType::Q6_K: return "Q6_K";
  }
  return "?";
}

// The fp16 scale arrays' offsets in a chunk, after the codes and masks.
constexpr int scales_offset(const Format& f) { return f.vectors * kVectorBytes + f.mask_bytes; }

}  // namespace fastgen::quant
