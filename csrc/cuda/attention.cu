// Paged causal attention on the GPU: the op's adapter, attention_launch (the kernel choice, torch-
// free, shared with the C++ benchmark), and the plain kernel for the batches the two fast kernels
// do not take (float32, head size 256, MLA's 576, misaligned views; see attention.h). Decode-only batches go
// to the split-KV kernel in decode_attention.cu, other bf16 / fp16 batches to the tensor-core
// kernel in prefill_attention.cu.
// The plain kernel: one thread block per (query token, query head), kWarps warps: each warp takes
// every kWarps-th visible key, a key's dot product is spread over the warp's lanes (HEAD_DIM / 32
// elements each, coalesced) and reduced with shuffles, and each warp keeps a float32 online
// softmax; the warps' partial results are merged through shared memory at the end. Blocks find
// their sequence by binary search over cu_seqlens_q, so the grid depends only on the token count.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <type_traits>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "core/attention_mask.h"
#include "core/dispatch.h"
#include "core/dtype.h"
#include "core/op_checks.h"
#include "cuda/attention.h"
#include "cuda/common.cuh"
#include "ops.h"

namespace fastgen::cuda {

namespace {

constexpr int kWarps = 4;

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
  const int64_t first = first_visible_key(pos, window, chunk);
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
cudaError_t device_attribute(int device, int* value) {
  static int values[64] = {};
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  if (values[device] == 0) {
    const cudaError_t error = cudaDeviceGetAttribute(&values[device], ATTR, device);
    if (error != cudaSuccess) return error;
  }
  *value = values[device];
  return cudaSuccess;
}

bool plain_kernels_only() {
  static const bool plain = [] {
    const char* value = std::getenv("FASTGEN_ATTENTION_KERNELS");
    return value != nullptr && std::string_view(value) == "plain";
  }();
  return plain;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f(type) with std::type_identity<T> for the dtype's CUDA type.
template <typename F>
cudaError_t with_cuda_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(std::type_identity<float>{});
    case DType::kFloat16: return f(std::type_identity<__half>{});
    case DType::kBFloat16: return f(std::type_identity<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(head_dim) with std::integral_constant<int, head_dim> for a head size with kernels.
template <typename F>
cudaError_t with_head_dim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    case kLatentHeadDim: return f(std::integral_constant<int, kLatentHeadDim>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

template <typename T, int HEAD_DIM>
cudaError_t plain_attention_launch(T* out, const T* query, const T* key_cache, const T* value_cache,
                                   const int32_t* cu_seqlens_q, const int32_t* seq_lens_k,
                                   const int32_t* block_tables, int64_t num_tokens,
                                   int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                   int64_t block_size, int64_t max_blocks_per_seq,
                                   int64_t query_stride, float scale,
                                   std::optional<int64_t> sliding_window,
                                   std::optional<int64_t> chunk_size, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(num_heads));
  attention_kernel<T, HEAD_DIM><<<grid, kWarps * 32, 0, stream>>>(
      out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k, block_tables,
      static_cast<int>(num_seqs), static_cast<int>(num_heads), static_cast<int>(num_kv_heads),
      static_cast<int>(block_size), static_cast<int>(max_blocks_per_seq), query_stride,
      scale * kLog2e, sliding_window.value_or(kUnbounded), chunk_size.value_or(kUnbounded));
  return cudaGetLastError();
}

#define FASTGEN_INSTANTIATE(T, D)                                                               \
  template cudaError_t plain_attention_launch<T, D>(                                            \
      T*, const T*, const T*, const T*, const int32_t*, const int32_t*, const int32_t*, int64_t, \
      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, std::optional<int64_t>,       \
      std::optional<int64_t>, cudaStream_t);
#define FASTGEN_INSTANTIATE_HEAD_DIMS(T)                                        \
  FASTGEN_INSTANTIATE(T, 64) FASTGEN_INSTANTIATE(T, 128) FASTGEN_INSTANTIATE(T, 256) \
  FASTGEN_INSTANTIATE(T, kLatentHeadDim)
FASTGEN_INSTANTIATE_HEAD_DIMS(float)
FASTGEN_INSTANTIATE_HEAD_DIMS(__half)
FASTGEN_INSTANTIATE_HEAD_DIMS(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE_HEAD_DIMS
#undef FASTGEN_INSTANTIATE

const char* attention_kernel_name(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::kDecode: return "decode";
    case AttentionKernel::kTensorCore: return "tensor cores";
    case AttentionKernel::kPlain: return "plain";
  }
  return "unknown";
}

bool attention_head_dim_supported(int64_t head_dim) {
  return head_dim == 64 || head_dim == 128 || head_dim == 256 || head_dim == kLatentHeadDim;
}

cudaError_t attention_launch(void* out, const void* query, const void* key_cache,
                             const void* value_cache, const int32_t* cu_seqlens_q,
                             const int32_t* seq_lens_k, const int32_t* block_tables, DType dtype,
                             int64_t num_tokens, int64_t num_seqs, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             int64_t max_blocks_per_seq, int64_t max_seqlen_q,
                             int64_t max_seqlen_k, int64_t query_stride, float scale,
                             std::optional<int64_t> sliding_window,
                             std::optional<int64_t> chunk_size,
                             const std::function<float*(int64_t)>& workspace, cudaStream_t stream,
                             AttentionKernel* launched) {
  if (!attention_head_dim_supported(head_dim)) return cudaErrorInvalidValue;
  int device = 0;
  if (const cudaError_t error = cudaGetDevice(&device); error != cudaSuccess) return error;
  // The choice (attention.h): the two fast kernels read rows with 16-byte loads.
  const bool aligned = (query_stride * element_size(dtype)) % 16 == 0 && aligned16(query) &&
                       aligned16(key_cache) && aligned16(value_cache);
  // MLA's latent rows (576) have no fast kernel yet: the plain one takes them.
  const bool fast = aligned && !plain_kernels_only() && head_dim != kLatentHeadDim;
  AttentionKernel kernel = AttentionKernel::kPlain;
  if (fast && max_seqlen_q == 1 && num_seqs <= 65535) {
    kernel = AttentionKernel::kDecode;
  } else if (fast && dtype != DType::kFloat32 && head_dim != 256 && num_seqs <= 65535 &&
             num_heads <= 65535) {
    int major = 0;
    if (const cudaError_t error = device_attribute<cudaDevAttrComputeCapabilityMajor>(device, &major);
        error != cudaSuccess) {
      return error;
    }
    if (major >= 8) kernel = AttentionKernel::kTensorCore;  // mma.sync on bf16 needs sm_80
  }
  if (launched != nullptr) *launched = kernel;

  return with_cuda_type(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return with_head_dim(head_dim, [&](auto dim) -> cudaError_t {
      constexpr int HEAD_DIM = decltype(dim)::value;
      auto* o = static_cast<T*>(out);
      const auto* q = static_cast<const T*>(query);
      const auto* k = static_cast<const T*>(key_cache);
      const auto* v = static_cast<const T*>(value_cache);
      if constexpr (HEAD_DIM != kLatentHeadDim) {  // no fast kernel for MLA rows yet
        if (kernel == AttentionKernel::kDecode) {
          int num_sms = 0;
          if (const cudaError_t error = device_attribute<cudaDevAttrMultiProcessorCount>(device, &num_sms);
              error != cudaSuccess) {
            return error;
          }
          const int num_splits = decode_attention_num_splits<T, HEAD_DIM>(
              num_seqs, num_heads, num_kv_heads, max_seqlen_k, num_sms);
          const int64_t floats = decode_attention_workspace_floats(num_seqs, num_heads, HEAD_DIM, num_splits);
          return decode_attention_launch<T, HEAD_DIM>(
              o, q, k, v, cu_seqlens_q, seq_lens_k, block_tables, floats > 0 ? workspace(floats) : nullptr,
              num_seqs, num_heads, num_kv_heads, block_size, max_blocks_per_seq, query_stride, scale,
              sliding_window, chunk_size, num_splits, stream);
        }
      }
      if constexpr (!std::is_same_v<T, float> && HEAD_DIM != 256 && HEAD_DIM != kLatentHeadDim) {
        if (kernel == AttentionKernel::kTensorCore) {
          return prefill_attention_launch<T, HEAD_DIM>(
              o, q, k, v, cu_seqlens_q, seq_lens_k, block_tables, num_seqs, num_heads, num_kv_heads,
              block_size, max_blocks_per_seq, max_seqlen_q, query_stride, scale, sliding_window,
              chunk_size, stream);
        }
      }
      return plain_attention_launch<T, HEAD_DIM>(
          o, q, k, v, cu_seqlens_q, seq_lens_k, block_tables, num_tokens, num_seqs, num_heads,
          num_kv_heads, block_size, max_blocks_per_seq, query_stride, scale, sliding_window,
          chunk_size, stream);
    });
  });
}

void attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
               const at::Tensor& value_cache, const at::Tensor& cu_seqlens_q,
               const at::Tensor& seq_lens_k, const at::Tensor& block_tables, int64_t max_seqlen_q,
               int64_t max_seqlen_k, double scale, std::optional<int64_t> sliding_window,
               std::optional<int64_t> chunk_size) {
  constexpr const char* op = "attention";
  // The metadata's values live on the device and are trusted (checking them would cost a host
  // sync per layer); what is left to check here is what the kernels support and the grid's limit.
  check_attention_args(out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k, block_tables,
                       sliding_window, chunk_size);
  const DType dtype = float_dtype(query.scalar_type(), op);
  TORCH_CHECK(attention_head_dim_supported(query.size(2)), op, ": unsupported head size ",
              query.size(2), " (supported: 64, 128, 256, and 576 for MLA)");
  TORCH_CHECK(query.size(1) <= 65535, op, ": at most 65535 query heads, got ", query.size(1));
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor workspace;  // the decode kernel's split partials, when it splits
  C10_CUDA_CHECK(attention_launch(
      out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
      cu_seqlens_q.data_ptr<int32_t>(), seq_lens_k.data_ptr<int32_t>(),
      block_tables.data_ptr<int32_t>(), dtype, query.size(0), seq_lens_k.size(0), query.size(1),
      key_cache.size(2), query.size(2), key_cache.size(1), block_tables.size(1), max_seqlen_q,
      max_seqlen_k, query.stride(0), static_cast<float>(scale), sliding_window, chunk_size,
      [&](int64_t floats) {
        // From torch's caching allocator (the graph's pool while a CUDA graph captures).
        workspace = at::empty({floats}, query.options().dtype(at::kFloat));
        return workspace.data_ptr<float>();
      },
      c10::cuda::getCurrentCUDAStream()));
}

void mla_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& latent_cache,
                   const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens_k,
                   const at::Tensor& block_tables, int64_t max_seqlen_q, int64_t max_seqlen_k,
                   double scale) {
  constexpr const char* op = "mla_attention";
  check_mla_attention_args(out, query, latent_cache, cu_seqlens_q, seq_lens_k, block_tables);
  TORCH_CHECK(query.size(2) == kLatentHeadDim && out.size(2) == 512, op,
              ": the CUDA kernels take latent rows of ", kLatentHeadDim,
              " (kv_lora_rank 512 + rope 64), got ", query.size(2), " with L = ", out.size(2));
  const c10::cuda::CUDAGuard guard(query.device());
  const bool aligned = query.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(query.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(latent_cache.data_ptr()) % 16 == 0;
  if (max_seqlen_q == 1 && aligned && std::getenv("FASTGEN_ATTENTION_KERNELS") == nullptr) {
    // Decode steps: the MLA kernel (mla_decode.cu), all heads over one read of each row.
    int num_sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, query.get_device()));
    const int splits = mla_decode_num_splits(seq_lens_k.size(0), query.size(1), max_seqlen_k, num_sms);
    const int64_t floats = mla_decode_workspace_floats(seq_lens_k.size(0), query.size(1), splits);
    // From torch's caching allocator (the graph's pool while a CUDA graph captures).
    const at::Tensor workspace = at::empty({std::max<int64_t>(floats, 1)}, query.options().dtype(at::kFloat));
    FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
      using T = cuda_type_t<scalar_t>;
      C10_CUDA_CHECK(mla_decode_launch<T>(
          reinterpret_cast<T*>(out.data_ptr<scalar_t>()), reinterpret_cast<const T*>(query.data_ptr<scalar_t>()),
          reinterpret_cast<const T*>(latent_cache.data_ptr<scalar_t>()), cu_seqlens_q.data_ptr<int32_t>(),
          seq_lens_k.data_ptr<int32_t>(), block_tables.data_ptr<int32_t>(), workspace.data_ptr<float>(),
          seq_lens_k.size(0), query.size(1), latent_cache.size(1), block_tables.size(1), query.stride(0),
          static_cast<float>(scale), splits, c10::cuda::getCurrentCUDAStream()));
    });
    return;
  }
  // Prefill and mixed batches: the plain kernel's 576-wide MLA instance over the rows as keys and
  // values, then the first L of each output row (no tensor-core MLA prefill kernel yet).
  at::Tensor full = at::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  const at::Tensor rows = latent_cache.unsqueeze(2);
  attention(full, query, rows, rows, cu_seqlens_q, seq_lens_k, block_tables, max_seqlen_q,
            max_seqlen_k, scale, std::nullopt, std::nullopt);
  out.copy_(full.narrow(2, 0, out.size(2)));
}

}  // namespace fastgen::cuda
