// Paged causal attention on the GPU: the op's adapter, and the plain kernel for batches with
// prefill tokens (prefill, chunked prefill; GQA, sliding window, chunks). Decode-only batches go
// to the split-KV kernel in decode_attention.cu; the tiled tensor-core prefill kernel is next.
// One thread block per (query token, query head), kWarps warps: each warp takes every kWarps-th
// visible key, a key's dot product is spread over the warp's lanes (HEAD_DIM / 32 elements each,
// coalesced) and reduced with shuffles, and each warp keeps a float32 online softmax; the warps'
// partial results are merged through shared memory at the end. Blocks find their sequence by
// binary search over cu_seqlens_q, so the grid depends only on the token count.
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <type_traits>
#include <limits>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cuda/attention.h"
#include "cuda/common.cuh"
#include "ops.h"

namespace fastgen::cuda {

namespace {

constexpr int kWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kWarps * 32)
attention_kernel(T* __restrict__ out,                       // [num_tokens, num_heads, HEAD_DIM]
                 const T* __restrict__ query,               // [num_tokens, num_heads, HEAD_DIM]
                 const T* __restrict__ key_cache,           // [num_blocks, block_size, num_kv_heads, HEAD_DIM]
                 const T* __restrict__ value_cache,         // [num_blocks, block_size, num_kv_heads, HEAD_DIM]
                 const int32_t* __restrict__ cu_seqlens_q,  // [num_seqs + 1]
                 const int32_t* __restrict__ seq_lens_k,    // [num_seqs]
                 const int32_t* __restrict__ block_tables,  // [num_seqs, max_blocks_per_seq]
                 int num_seqs, int num_heads, int num_kv_heads, int block_size,
                 int max_blocks_per_seq, int64_t query_stride, float scale_log2, int64_t window,
                 int64_t chunk) {
  constexpr int kPerLane = HEAD_DIM / 32;
  const int token = blockIdx.x, head = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // The sequence holding this token: the last b with cu_seqlens_q[b] <= token (skips q_len 0).
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu_seqlens_q[mid] <= token) lo = mid; else hi = mid - 1;
  }
  const int seq = lo;
  const int64_t q_len = cu_seqlens_q[seq + 1] - cu_seqlens_q[seq];
  const int64_t k_len = seq_lens_k[seq];
  const int64_t pos = k_len - q_len + (token - cu_seqlens_q[seq]);
  const int64_t first = max(max(int64_t{0}, pos - window + 1), pos / chunk * chunk);
  const int kv_head = head / (num_heads / num_kv_heads);
  const int32_t* block_table = block_tables + static_cast<int64_t>(seq) * max_blocks_per_seq;

  float q[kPerLane], acc[kPerLane];
  const T* q_row = query + token * query_stride + static_cast<int64_t>(head) * HEAD_DIM;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    q[e] = to_float(q_row[e * 32 + lane]) * scale_log2;  // scores in the log2 domain
    acc[e] = 0.f;
  }
  float row_max = -INFINITY, row_sum = 0.f;
  for (int64_t j = first + warp; j <= pos; j += kWarps) {
    const int64_t slot = static_cast<int64_t>(block_table[j / block_size]) * block_size + j % block_size;
    const int64_t offset = (slot * num_kv_heads + kv_head) * HEAD_DIM;
    const T* k = key_cache + offset;
    const T* v = value_cache + offset;
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dot += q[e] * to_float(k[e * 32 + lane]);
    const float score = warp_sum(dot);
    const float new_max = fmaxf(row_max, score);
    const float alpha = exp2f(row_max - new_max);  // 0 for the first key (row_max = -inf)
    const float p = exp2f(score - new_max);
    row_sum = row_sum * alpha + p;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] = acc[e] * alpha + p * to_float(v[e * 32 + lane]);
    row_max = new_max;
  }

  // Merge the warps: rescale each to the common max. A warp that saw no key has max -inf and
  // sum 0; warp 0 always sees key `first` (<= pos), so the common max is finite.
  __shared__ float warp_max[kWarps], warp_sum_[kWarps];
  __shared__ float warp_acc[kWarps][HEAD_DIM];
  if (lane == 0) {
    warp_max[warp] = row_max;
    warp_sum_[warp] = row_sum;
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) warp_acc[warp][e * 32 + lane] = acc[e];
  __syncthreads();
  float total_max = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total_max = fmaxf(total_max, warp_max[w]);
  float weights[kWarps], total_sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    weights[w] = exp2f(warp_max[w] - total_max);
    total_sum += warp_sum_[w] * weights[w];
  }
  T* out_row = out + (static_cast<int64_t>(token) * num_heads + head) * HEAD_DIM;
  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_acc[w][d] * weights[w];
    out_row[d] = from_float<T>(sum / total_sum);
  }
}

// A device attribute, asked once per (attribute, device): a cheap query, but not free per layer.
template <cudaDeviceAttr ATTR>
int device_attribute(int device) {
  static int values[64] = {};
  TORCH_CHECK(device >= 0 && device < 64, "attention: device index ", device, " out of range");
  if (values[device] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&values[device], ATTR, device));
  return values[device];
}

bool plain_kernels_only() {
  static const bool plain = [] {
    const char* value = std::getenv("FASTGEN_ATTENTION_KERNELS");
    return value != nullptr && std::string_view(value) == "plain";
  }();
  return plain;
}

}  // namespace

template <typename T, int HEAD_DIM>
cudaError_t attention_launch(T* out, const T* query, const T* key_cache, const T* value_cache,
                             const int32_t* cu_seqlens_q, const int32_t* seq_lens_k,
                             const int32_t* block_tables, int64_t num_tokens, int64_t num_seqs,
                             int64_t num_heads, int64_t num_kv_heads, int64_t block_size,
                             int64_t max_blocks_per_seq, int64_t query_stride, float scale,
                             std::optional<int64_t> sliding_window,
                             std::optional<int64_t> chunk_size, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  // No window / no chunk are the infinite ones: p - j < INT64_MAX and j / INT64_MAX == 0 always.
  constexpr int64_t kUnbounded = std::numeric_limits<int64_t>::max();
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(num_heads));
  attention_kernel<T, HEAD_DIM><<<grid, kWarps * 32, 0, stream>>>(
      out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k, block_tables,
      static_cast<int>(num_seqs), static_cast<int>(num_heads), static_cast<int>(num_kv_heads),
      static_cast<int>(block_size), static_cast<int>(max_blocks_per_seq), query_stride,
      scale * kLog2e, sliding_window.value_or(kUnbounded), chunk_size.value_or(kUnbounded));
  return cudaGetLastError();
}

#define FASTGEN_INSTANTIATE(T, D)                                                                \
  template cudaError_t attention_launch<T, D>(T*, const T*, const T*, const T*, const int32_t*, \
                                              const int32_t*, const int32_t*, int64_t, int64_t, \
                                              int64_t, int64_t, int64_t, int64_t, int64_t,      \
                                              float, std::optional<int64_t>,                    \
                                              std::optional<int64_t>, cudaStream_t);
#define FASTGEN_INSTANTIATE_HEAD_DIMS(T) \
  FASTGEN_INSTANTIATE(T, 64) FASTGEN_INSTANTIATE(T, 128) FASTGEN_INSTANTIATE(T, 256)
FASTGEN_INSTANTIATE_HEAD_DIMS(float)
FASTGEN_INSTANTIATE_HEAD_DIMS(__half)
FASTGEN_INSTANTIATE_HEAD_DIMS(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE_HEAD_DIMS
#undef FASTGEN_INSTANTIATE

void attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
               const at::Tensor& value_cache, const at::Tensor& cu_seqlens_q,
               const at::Tensor& seq_lens_k, const at::Tensor& block_tables, int64_t max_seqlen_q,
               int64_t max_seqlen_k, double scale, std::optional<int64_t> sliding_window,
               std::optional<int64_t> chunk_size) {
  constexpr const char* op = "attention";
  // The metadata's values live on the device and are trusted (checking them would cost a host
  // sync per layer); what is left to check here is the grid's limit.
  check_attention_args(out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k, block_tables,
                       sliding_window, chunk_size);
  TORCH_CHECK(query.size(1) <= 65535, op, ": at most 65535 query heads, got ", query.size(1));
  const int64_t num_seqs = seq_lens_k.size(0);
  const c10::cuda::CUDAGuard guard(query.device());
  // Decode steps (one query per sequence) take the split-KV kernel and other bf16 / fp16 batches
  // the tensor-core kernel, both of which read query and cache rows with 16-byte loads; the rest
  // (float32, head size 256, misaligned views) the plain kernel. FASTGEN_ATTENTION_KERNELS=plain
  // sends everything to the plain kernel (for bisecting a wrong result).
  const int64_t vec_bytes = 16, elem = query.element_size();
  const bool aligned = (query.stride(0) * elem) % vec_bytes == 0 &&
                       reinterpret_cast<uintptr_t>(query.data_ptr()) % vec_bytes == 0 &&
                       reinterpret_cast<uintptr_t>(key_cache.data_ptr()) % vec_bytes == 0 &&
                       reinterpret_cast<uintptr_t>(value_cache.data_ptr()) % vec_bytes == 0;
  const bool fast = aligned && !plain_kernels_only();
  const bool decode = fast && max_seqlen_q == 1 && num_seqs <= 65535;
  const bool tensor_cores =
      fast && !decode && query.scalar_type() != at::kFloat && query.size(2) != 256 &&
      num_seqs <= 65535 && query.size(1) <= 65535 &&
      device_attribute<cudaDevAttrComputeCapabilityMajor>(query.get_device()) >= 8;  // sm_80+
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    using T = cuda_type_t<scalar_t>;
    FASTGEN_DISPATCH_HEAD_DIM(query.size(2), op, [&] {
      auto* out_ptr = reinterpret_cast<T*>(out.data_ptr());
      const auto* q_ptr = reinterpret_cast<const T*>(query.data_ptr());
      const auto* k_ptr = reinterpret_cast<const T*>(key_cache.data_ptr());
      const auto* v_ptr = reinterpret_cast<const T*>(value_cache.data_ptr());
      const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
      const int32_t* lens = seq_lens_k.data_ptr<int32_t>();
      const int32_t* tables = block_tables.data_ptr<int32_t>();
      const float scale_f = static_cast<float>(scale);
      if (decode) {
        const int num_splits = decode_attention_num_splits<T, HEAD_DIM>(
            num_seqs, query.size(1), key_cache.size(2), max_seqlen_k,
            device_attribute<cudaDevAttrMultiProcessorCount>(query.get_device()));
        // From torch's caching allocator (the graph's pool while a CUDA graph captures).
        const at::Tensor workspace = at::empty(
            {decode_attention_workspace_floats(num_seqs, query.size(1), HEAD_DIM, num_splits)},
            query.options().dtype(at::kFloat));
        C10_CUDA_CHECK((decode_attention_launch<T, HEAD_DIM>(
            out_ptr, q_ptr, k_ptr, v_ptr, cu, lens, tables, workspace.data_ptr<float>(), num_seqs,
            query.size(1), key_cache.size(2), key_cache.size(1), block_tables.size(1),
            query.stride(0), scale_f, sliding_window, chunk_size, num_splits, stream)));
        return;
      }
      if constexpr (!std::is_same_v<T, float> && HEAD_DIM != 256) {
        if (tensor_cores) {
          C10_CUDA_CHECK((prefill_attention_launch<T, HEAD_DIM>(
              out_ptr, q_ptr, k_ptr, v_ptr, cu, lens, tables, num_seqs, query.size(1),
              key_cache.size(2), key_cache.size(1), block_tables.size(1), max_seqlen_q,
              query.stride(0), scale_f, sliding_window, chunk_size, stream)));
          return;
        }
      }
      C10_CUDA_CHECK((attention_launch<T, HEAD_DIM>(
          out_ptr, q_ptr, k_ptr, v_ptr, cu, lens, tables, query.size(0), num_seqs, query.size(1),
          key_cache.size(2), key_cache.size(1), block_tables.size(1), query.stride(0), scale_f,
          sliding_window, chunk_size, stream)));
    });
  });
}

}  // namespace fastgen::cuda
