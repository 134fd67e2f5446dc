// Block-quantized linear layers on the CPU (the layout: core/quant_format.h).
//
// quant_linear_launch: out = input @ W^T + bias for a packed weight W [n, k], streaming W once:
// the input rows are quantized per 32 elements in two int8 digits (x ~ dx * qx + dx2 * qx2, round
// to nearest even; see QuantizedInput in quant.cpp), each 16-row tile of W is walked once per
// pass of up to kQuantMaxRows input rows, and every group of G codes becomes two exact int32 dot
// products, one per digit (VPDPBUSD with AVX512-VNNI; TDPBSUD over 16 input rows at a time with
// AMX-INT8, from kAmxMinRows rows; plain integer loops on the portable path),
// scaled into fp32 as
//   u = fma(idot2, dx2, idot * dx);  acc = fma(o, xsum, fma(s, u, acc))
// in K order. Both paths do exactly these float operations, so their results are bitwise equal,
// and a token's output does not depend on the other rows of its batch. The path is chosen at
// run time from what the processor has (cpu_has_vnni512, cpu_has_amx_int8), whatever the build
// flags were.
//
// quant_dequantize_launch: rows of W as float (s * code + o, one rounding each, as
// gguf.quants.dequantize computes them): the embedding lookup and the prefill path.
#pragma once

#include <cstdint>

#include "core/quant_format.h"

namespace fastgen::cpu {

constexpr int kQuantMaxRows = 6;  // input rows per pass over a tile (VNNI, portable)
constexpr int kAmxMinRows = 12;   // from this many input rows, AMX-INT8 where the CPU has it

// True when the processor runs the AVX-512 VNNI kernels (AVX512F/BW/VL/VNNI and F16C).
bool cpu_has_vnni512();
// (AMX-INT8 is cpu/amx.h's cpu_has_amx_int8.)

// out: [m, n] with rows out_stride apart (a column slice of a wider output is fine); input:
// [m, k] float, rows input_stride apart; packed: core/quant_format.h's [ceil(n / 16), k / SB,
// chunk_bytes]; bias: [n] float or nullptr. OutT: float, c10::Half or c10::BFloat16.
template <typename InT, typename OutT>
void quant_linear_launch(OutT* out, int64_t out_stride, const InT* input, int64_t input_stride,
                         const uint8_t* packed, quant::QType qtype, const float* bias, int64_t m,
                         int64_t n, int64_t k, bool portable);

// out[i, :] = row rows[i] of W (all n rows in order when rows is nullptr). out: [count, k].
template <typename OutT>
void quant_dequantize_launch(OutT* out, const uint8_t* packed, quant::QType qtype,
                             const int64_t* rows, int64_t count, int64_t k);

}  // namespace fastgen::cpu
