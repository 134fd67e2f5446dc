// Block-quantized weights on the GPU (the layout: core/quant_format.h; decoding:
// core/quant_decode.h, shared with the CPU).
//   - quant_linear: the dequantize-GEMV of decode steps, for up to kMaxTokens input rows per
//     pass. One CTA per 16-row tile; thread (r, lane) = (threadIdx.x % 16, threadIdx.x / 16)
//     walks row r's groups lane, lane + 16, ... so each warp reads two groups' 64-byte code
//     vectors whole (coalesced), decodes its codes to fp32 (s * code + o), multiplies them by
//     the fp32 activations (read through L1, shared by the tile's rows) and keeps one sum per
//     input row; the 16 lanes of a row are then summed through shared memory. Activations are
//     not quantized here: the GPU has FLOPs to spare at decode, so the result is the dequantized
//     weight's product in fp32.
//   - quant_dequantize: rows of the weight (all, or an index list) in fp32 / fp16 / bf16: the
//     embedding lookup, and prefill's weight before cuBLAS (python/fastgen/quantization).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "core/quant_decode.h"
#include "cuda/common.cuh"
#include "ops.h"

namespace fastgen::cuda {

namespace {

using quant::Format;
using quant::QType;
using quant::format_of;
using quant::kTileRows;

constexpr int kLanes = 16;                 // threads per tile row
constexpr int kThreads = kTileRows * kLanes;
constexpr int kMaxTokens = 8;              // input rows per pass

template <QType Q, typename T, typename OutT>
__global__ void quant_gemv_kernel(OutT* __restrict__ out, int64_t out_stride,
                                  const T* __restrict__ input, int64_t input_stride,
                                  const uint8_t* __restrict__ packed, const float* __restrict__ bias,
                                  int tokens, int64_t n, int64_t k) {
  constexpr Format F = format_of(Q);
  constexpr int G = F.group_elems;
  const int r = threadIdx.x % kTileRows, lane = threadIdx.x / kTileRows;
  const int64_t chunks = k / F.super_elems;
  const uint8_t* tile = packed + blockIdx.x * chunks * F.chunk_bytes();
  float acc[kMaxTokens];
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) acc[t] = 0.f;
  const int64_t groups = chunks * F.groups();
  for (int64_t item = lane; item < groups; item += kLanes) {
    const int64_t c = item / F.groups();
    const int g = static_cast<int>(item % F.groups());
    const uint8_t* chunk = tile + c * F.chunk_bytes();
    float s, o;
    quant::scale_at<Q>(chunk, r, g, s, o);
    const int64_t e0 = c * F.super_elems + g * G;
    for (int e = 0; e < G; ++e) {
      const float w = s * static_cast<float>(quant::code_at<Q>(chunk, r, g * G + e)) + o;
#pragma unroll
      for (int t = 0; t < kMaxTokens; ++t)
        if (t < tokens) acc[t] = fmaf(w, to_float(__ldg(input + t * input_stride + e0 + e)), acc[t]);
    }
  }
  __shared__ float partial[kMaxTokens][kLanes][kTileRows];
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) partial[t][lane][r] = acc[t];
  __syncthreads();
  if (threadIdx.x < kTileRows * kMaxTokens) {
    const int t = threadIdx.x / kTileRows, row = threadIdx.x % kTileRows;
    const int64_t out_row = blockIdx.x * kTileRows + row;
    if (t < tokens && out_row < n) {
      float sum = 0.f;
      for (int l = 0; l < kLanes; ++l) sum += partial[t][l][row];
      if (bias) sum += bias[out_row];
      out[t * out_stride + out_row] = from_float<OutT>(sum);
    }
  }
}

template <QType Q, typename OutT>
__global__ void quant_dequantize_kernel(OutT* __restrict__ out, const uint8_t* __restrict__ packed,
                                        const int64_t* __restrict__ rows, int64_t k) {
  constexpr Format F = format_of(Q);
  const int64_t row = rows ? rows[blockIdx.x] : blockIdx.x;
  const int64_t chunks = k / F.super_elems;
  const uint8_t* tile = packed + (row / kTileRows) * chunks * F.chunk_bytes();
  const int r = static_cast<int>(row % kTileRows);
  OutT* dst = out + blockIdx.x * k;
  for (int64_t e = threadIdx.x; e < k; e += blockDim.x) {
    const int64_t c = e / F.super_elems;
    const int ce = static_cast<int>(e % F.super_elems);
    const uint8_t* chunk = tile + c * F.chunk_bytes();
    float s, o;
    quant::scale_at<Q>(chunk, r, ce / F.group_elems, s, o);
    dst[e] = from_float<OutT>(quant::weight_value<Q>(s, o, quant::code_at<Q>(chunk, r, ce)));
  }
}

}  // namespace

void quant_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& packed,
                  int64_t qtype, int64_t n, const std::optional<at::Tensor>& bias,
                  bool portable) {
  check_quant_linear_args(out, input, packed, qtype, n, bias);
  (void)portable;  // one kernel on the GPU
  const at::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t m = input.size(0), k = input.size(1);
  if (m == 0 || n == 0) return;
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const auto q = static_cast<QType>(qtype);
  const unsigned tiles = static_cast<unsigned>((n + kTileRows - 1) / kTileRows);
  FASTGEN_DISPATCH_FLOAT(input.scalar_type(), "quant_linear", [&] {
    using T = cuda_type_t<scalar_t>;
    const T* x = reinterpret_cast<const T*>(input.data_ptr<scalar_t>());
    auto launch = [&](auto* out_ptr) {
      using OutT = std::remove_pointer_t<decltype(out_ptr)>;
      FASTGEN_DISPATCH_QTYPE(q, [&] {
        for (int64_t t0 = 0; t0 < m; t0 += kMaxTokens) {
          const int tokens = static_cast<int>(std::min<int64_t>(kMaxTokens, m - t0));
          quant_gemv_kernel<Q, T, OutT><<<tiles, kThreads, 0, stream>>>(
              out_ptr + t0 * out.stride(0), out.stride(0), x + t0 * input.stride(0),
              input.stride(0), packed.data_ptr<uint8_t>(), b, tokens, n, k);
        }
      });
    };
    if (out.scalar_type() == input.scalar_type()) {
      launch(reinterpret_cast<T*>(out.data_ptr<scalar_t>()));
    } else {
      launch(out.data_ptr<float>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void quant_dequantize(at::Tensor& out, const at::Tensor& packed, int64_t qtype,
                      const std::optional<at::Tensor>& rows) {
  check_quant_dequantize_args(out, packed, qtype, rows);
  const at::cuda::CUDAGuard guard(packed.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t count = out.size(0), k = out.size(1);
  if (count == 0) return;
  const int64_t* row_ptr = rows ? rows->data_ptr<int64_t>() : nullptr;
  const auto q = static_cast<QType>(qtype);
  FASTGEN_DISPATCH_FLOAT(out.scalar_type(), "quant_dequantize", [&] {
    using OutT = cuda_type_t<scalar_t>;
    FASTGEN_DISPATCH_QTYPE(q, [&] {
      quant_dequantize_kernel<Q, OutT><<<static_cast<unsigned>(count), 256, 0, stream>>>(
          reinterpret_cast<OutT*>(out.data_ptr<scalar_t>()), packed.data_ptr<uint8_t>(), row_ptr, k);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastgen::cuda
