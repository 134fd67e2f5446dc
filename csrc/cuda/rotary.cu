// Rotary position embedding on the GPU, alone (in place on query and key) or fused with the paged
// KV cache write (query rotated in place; the rotated key and the value go straight into their
// cache slot, so the key is read once and never written back). One block per token: its
// threads take the token's work items (a rotated vector of a query head, of a key head, a
// key's unrotated tail, a value vector) in turn. Where sizes and alignment allow, an item is N
// elements moved with 16-byte accesses (N = 8 for bf16); otherwise one element (pair) at a time.
// query and key may be column slices of one fused qkv tensor, so rows are addressed through their
// own strides. With q/k norm weights (Qwen3, Llama 4) the cache variant is a second kernel: one
// warp per head reduces the head's sum of squares, then normalises (rounding to T, as the
// rms_norm op does) and rotates its pairs in registers. Positions and slots are trusted here (a
// device kernel cannot raise; the CPU adapters check them); a negative slot is padding and is not
// written.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cuda/common.cuh"
#include "cuda/rotary.h"
#include "ops.h"

namespace fastgen::cuda {

namespace {

constexpr int kThreads = 128;

// Rotates item `item` of a head (src -> dst; the same row when in place).
//   neox:  the pairs (i, i + half) for i in [item * N, item * N + N): two N-vectors.
//   GPT-J: the pairs (2i, 2i + 1) inside the N-vector at item * N (N / 2 pairs); with N = 1 the
//          item is one pair, read element by element.
template <typename T, int N, bool IS_NEOX>
__device__ __forceinline__ void rotate_item(const T* __restrict__ src, T* __restrict__ dst,
                                            const float* __restrict__ cos,
                                            const float* __restrict__ sin, int64_t item,
                                            int64_t half) {
  if constexpr (IS_NEOX) {
    const int64_t i = item * N;
    const auto a = Vec<T, N>::load(src + i), b = Vec<T, N>::load(src + i + half);
    Vec<T, N> ra, rb;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float c = cos[i + e], s = sin[i + e];
      ra.v[e] = from_float<T>(a.f(e) * c - b.f(e) * s);
      rb.v[e] = from_float<T>(b.f(e) * c + a.f(e) * s);
    }
    ra.store(dst + i);
    rb.store(dst + i + half);
  } else if constexpr (N == 1) {
    const float xa = to_float(src[2 * item]), xb = to_float(src[2 * item + 1]);
    const float c = cos[item], s = sin[item];
    dst[2 * item] = from_float<T>(xa * c - xb * s);
    dst[2 * item + 1] = from_float<T>(xb * c + xa * s);
  } else {
    const int64_t i = item * N;
    const auto x = Vec<T, N>::load(src + i);
    Vec<T, N> r;
#pragma unroll
    for (int p = 0; p < N / 2; ++p) {
      const float c = cos[i / 2 + p], s = sin[i / 2 + p];
      r.v[2 * p] = from_float<T>(x.f(2 * p) * c - x.f(2 * p + 1) * s);
      r.v[2 * p + 1] = from_float<T>(x.f(2 * p + 1) * c + x.f(2 * p) * s);
    }
    r.store(dst + i);
  }
}

// CACHE = false: query and key rotated in place. CACHE = true: query in place, and the token's
// rotated key heads (with their unrotated tails) and value heads written to its cache slot.
template <typename T, int N, bool IS_NEOX, bool CACHE>
__global__ void __launch_bounds__(kThreads)
rotary_kernel(const int64_t* __restrict__ positions,    // [num_tokens]
              T* __restrict__ query,                    // [num_tokens, num_heads * head_size]
              T* __restrict__ key,                      // [num_tokens, num_kv_heads * head_size]
              const T* __restrict__ value,              // [num_tokens, num_kv_heads * head_size] (CACHE)
              const float* __restrict__ cos_sin_cache,  // [max_position, rot_dim]
              T* __restrict__ key_cache,                // [num_slots, num_kv_heads, head_size] (CACHE)
              T* __restrict__ value_cache,              // [num_slots, num_kv_heads, head_size] (CACHE)
              const int64_t* __restrict__ slot_mapping, // [num_tokens] (CACHE)
              int num_heads, int num_kv_heads, int head_size, int rot_dim, int64_t query_stride,
              int64_t key_stride, int64_t value_stride) {
  const int64_t t = blockIdx.x;
  const int64_t half = rot_dim / 2;
  const float* cos = cos_sin_cache + positions[t] * rot_dim;
  const float* sin = cos + half;
  // Items per head: rotated ones (N pairs for neox, N elements = N / 2 pairs for GPT-J), and the
  // head's vectors past rot_dim (copied to the cache unrotated).
  const int rot_items = IS_NEOX ? static_cast<int>(half / N) : rot_dim / (N == 1 ? 2 : N);
  const int tail_items = (head_size - rot_dim) / N;
  const int head_items = head_size / N;

  T* q_row = query + t * query_stride;
  for (int item = threadIdx.x; item < num_heads * rot_items; item += blockDim.x) {
    T* head = q_row + static_cast<int64_t>(item / rot_items) * head_size;
    rotate_item<T, N, IS_NEOX>(head, head, cos, sin, item % rot_items, half);
  }

  T* k_row = key + t * key_stride;
  if constexpr (!CACHE) {
    for (int item = threadIdx.x; item < num_kv_heads * rot_items; item += blockDim.x) {
      T* head = k_row + static_cast<int64_t>(item / rot_items) * head_size;
      rotate_item<T, N, IS_NEOX>(head, head, cos, sin, item % rot_items, half);
    }
  } else {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) return;
    const int64_t row = static_cast<int64_t>(num_kv_heads) * head_size;
    T* k_out = key_cache + slot * row;
    T* v_out = value_cache + slot * row;
    const T* v_row = value + t * value_stride;
    const int k_items = rot_items + tail_items;
    for (int item = threadIdx.x; item < num_kv_heads * (k_items + head_items); item += blockDim.x) {
      if (item < num_kv_heads * k_items) {
        const int64_t offset = static_cast<int64_t>(item / k_items) * head_size;
        const int i = item % k_items;
        if (i < rot_items) {
          rotate_item<T, N, IS_NEOX>(k_row + offset, k_out + offset, cos, sin, i, half);
        } else {
          const int64_t e = rot_dim + static_cast<int64_t>(i - rot_items) * N;
          Vec<T, N>::load(k_row + offset + e).store(k_out + offset + e);
        }
      } else {
        const int64_t e = static_cast<int64_t>(item - num_kv_heads * k_items) * N;
        Vec<T, N>::load(v_row + e).store(v_out + e);  // a value row is its heads back to back
      }
    }
  }
}

// rotary_kernel<CACHE = true> with a per-head RMS norm first: one block per token, one warp per
// head (the query heads, then, unless the slot is padding, the key heads, which go to the cache),
// and the value row copied by the whole block. A lane reads the head for the sum of squares, and
// after the warp's reduction writes only the elements of its own pairs, so the query is
// normalised and rotated in place without a race. One element at a time: the heads this serves
// are 64-256 wide, and the pass is bound by the qkv row it reads.
template <typename T, bool IS_NEOX>
__global__ void __launch_bounds__(kThreads)
rotary_norm_cache_kernel(const int64_t* __restrict__ positions,    // [num_tokens]
                         T* __restrict__ query,                    // [num_tokens, num_heads * head_size]
                         const T* __restrict__ key,                // [num_tokens, num_kv_heads * head_size]
                         const T* __restrict__ value,              // [num_tokens, num_kv_heads * head_size]
                         const float* __restrict__ cos_sin_cache,  // [max_position, rot_dim]
                         T* __restrict__ key_cache,                // [num_slots, num_kv_heads, head_size]
                         T* __restrict__ value_cache,              // [num_slots, num_kv_heads, head_size]
                         const int64_t* __restrict__ slot_mapping, // [num_tokens]
                         const T* __restrict__ q_norm_weight,      // [head_size]
                         const T* __restrict__ k_norm_weight,      // [head_size]
                         float norm_eps, int num_heads, int num_kv_heads, int head_size,
                         int rot_dim, int64_t query_stride, int64_t key_stride,
                         int64_t value_stride) {
  const int64_t t = blockIdx.x;
  const int half = rot_dim / 2;
  const float* cos = cos_sin_cache + positions[t] * rot_dim;
  const float* sin = cos + half;
  const int64_t slot = slot_mapping[t];
  const int64_t row = static_cast<int64_t>(num_kv_heads) * head_size;
  const int lane = threadIdx.x % 32;
  const int heads = num_heads + (slot < 0 ? 0 : num_kv_heads);
  for (int h = threadIdx.x / 32; h < heads; h += kThreads / 32) {
    const bool is_query = h < num_heads;
    const int kv_head = h - num_heads;
    const T* src = is_query ? query + t * query_stride + static_cast<int64_t>(h) * head_size
                            : key + t * key_stride + static_cast<int64_t>(kv_head) * head_size;
    T* dst = is_query ? const_cast<T*>(src)
                      : key_cache + slot * row + static_cast<int64_t>(kv_head) * head_size;
    const T* weight = is_query ? q_norm_weight : k_norm_weight;
    float sum_sq = 0.f;
    for (int i = lane; i < head_size; i += 32) {
      const float x = to_float(src[i]);
      sum_sq += x * x;
    }
    const float inv_rms = rsqrtf(warp_sum(sum_sq) / static_cast<float>(head_size) + norm_eps);
    // The normalised element, rounded to T as the rms_norm op stores it.
    const auto normed = [&](int i) {
      return to_float(from_float<T>(to_float(src[i]) * inv_rms * to_float(weight[i])));
    };
    for (int p = lane; p < half; p += 32) {
      const int ia = IS_NEOX ? p : 2 * p, ib = IS_NEOX ? p + half : 2 * p + 1;
      const float a = normed(ia), b = normed(ib), c = cos[p], s = sin[p];
      dst[ia] = from_float<T>(a * c - b * s);
      dst[ib] = from_float<T>(b * c + a * s);
    }
    for (int i = rot_dim + lane; i < head_size; i += 32) dst[i] = from_float<T>(normed(i));
  }
  if (slot < 0) return;
  const T* v_row = value + t * value_stride;
  for (int64_t e = threadIdx.x; e < row; e += blockDim.x) value_cache[slot * row + e] = v_row[e];
}

// DeepSeek's MLA cache write: one block per token. The block rotates the last rot_dim of each
// query head in place (one pair per thread and step), then, unless the slot is padding, reduces
// the latent's sum of squares and writes the normalised latent and the rotated k_pe into the
// token's cache row. One element at a time: the row is 576 wide and read once.
template <typename T, bool IS_NEOX>
__global__ void __launch_bounds__(kThreads)
mla_rotary_cache_kernel(const int64_t* __restrict__ positions,    // [num_tokens]
                        T* __restrict__ query,                    // [num_tokens, num_heads * head_size]
                        const T* __restrict__ kv_a,               // [num_tokens, latent_size + rot_dim]
                        const T* __restrict__ kv_norm_weight,     // [latent_size]
                        float norm_eps,
                        const float* __restrict__ cos_sin_cache,  // [max_position, rot_dim]
                        T* __restrict__ latent_cache,             // [num_slots, latent_size + rot_dim]
                        const int64_t* __restrict__ slot_mapping, // [num_tokens]
                        int num_heads, int head_size, int latent_size, int rot_dim,
                        int64_t query_stride, int64_t kv_a_stride) {
  const int64_t t = blockIdx.x;
  const int half = rot_dim / 2;
  const float* cos = cos_sin_cache + positions[t] * rot_dim;
  const float* sin = cos + half;
  const auto rotate_pair = [&](const T* src, T* dst, int p) {
    const int ia = IS_NEOX ? p : 2 * p, ib = IS_NEOX ? p + half : 2 * p + 1;
    const float a = to_float(src[ia]), b = to_float(src[ib]), c = cos[p], s = sin[p];
    dst[ia] = from_float<T>(a * c - b * s);
    dst[ib] = from_float<T>(b * c + a * s);
  };
  T* q_row = query + t * query_stride + (head_size - rot_dim);
  for (int item = threadIdx.x; item < num_heads * half; item += blockDim.x) {
    T* head = q_row + static_cast<int64_t>(item / half) * head_size;
    rotate_pair(head, head, item % half);
  }
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;  // the same for the whole block
  const T* src = kv_a + t * kv_a_stride;
  T* out = latent_cache + slot * (latent_size + rot_dim);
  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < latent_size; i += blockDim.x) {
    const float x = to_float(src[i]);
    sum_sq += x * x;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / static_cast<float>(latent_size) + norm_eps);
  for (int i = threadIdx.x; i < latent_size; i += blockDim.x) {
    out[i] = from_float<T>(to_float(src[i]) * inv_rms * to_float(kv_norm_weight[i]));
  }
  for (int p = threadIdx.x; p < half; p += blockDim.x) {
    rotate_pair(src + latent_size, out + latent_size, p);
  }
}

template <typename T, int N, bool IS_NEOX, bool CACHE>
void launch(const int64_t* positions, T* query, T* key, const T* value,
            const float* cos_sin_cache, T* key_cache, T* value_cache,
            const int64_t* slot_mapping, int64_t num_tokens, int64_t num_heads,
            int64_t num_kv_heads, int64_t head_size, int64_t rot_dim, int64_t query_stride,
            int64_t key_stride, int64_t value_stride, cudaStream_t stream) {
  rotary_kernel<T, N, IS_NEOX, CACHE><<<static_cast<unsigned>(num_tokens), kThreads, 0, stream>>>(
      positions, query, key, value, cos_sin_cache, key_cache, value_cache, slot_mapping,
      static_cast<int>(num_heads), static_cast<int>(num_kv_heads), static_cast<int>(head_size),
      static_cast<int>(rot_dim), query_stride, key_stride, value_stride);
}

// Picks the vector width (16 bytes when every row, head, rotary half and pointer allows it) and
// the layout, and launches.
template <typename T, bool CACHE>
cudaError_t dispatch(const int64_t* positions, T* query, T* key, const T* value,
                     const float* cos_sin_cache, T* key_cache, T* value_cache,
                     const int64_t* slot_mapping, int64_t num_tokens, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_size, int64_t rot_dim,
                     int64_t query_stride, int64_t key_stride, int64_t value_stride,
                     bool is_neox, cudaStream_t stream) {
  if (num_tokens == 0 || (rot_dim == 0 && !CACHE)) return cudaSuccess;
  constexpr int N = kVec16<T>;
  // neox rotates runs of half elements, GPT-J runs of rot_dim; both need whole vectors.
  const int64_t run = is_neox ? rot_dim / 2 : rot_dim;
  const bool wide = run % N == 0 && head_size % N == 0 &&
                    vec_aligned<N, T>(head_size, query_stride, {query}) &&
                    vec_aligned<N, T>(head_size, key_stride, {key}) &&
                    (!CACHE || vec_aligned<N, T>(head_size, value_stride,
                                                 {value, key_cache, value_cache}));
  FASTGEN_DISPATCH_BOOL(is_neox, IS_NEOX, [&] {
    if (wide) {
      launch<T, N, IS_NEOX, CACHE>(positions, query, key, value, cos_sin_cache, key_cache,
                                   value_cache, slot_mapping, num_tokens, num_heads, num_kv_heads,
                                   head_size, rot_dim, query_stride, key_stride, value_stride,
                                   stream);
    } else {
      launch<T, 1, IS_NEOX, CACHE>(positions, query, key, value, cos_sin_cache, key_cache,
                                   value_cache, slot_mapping, num_tokens, num_heads, num_kv_heads,
                                   head_size, rot_dim, query_stride, key_stride, value_stride,
                                   stream);
    }
  });
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t rotary_embedding_launch(const int64_t* positions, T* query, T* key,
                                    const float* cos_sin_cache, int64_t num_tokens,
                                    int64_t num_heads, int64_t num_kv_heads, int64_t head_size,
                                    int64_t rot_dim, int64_t query_stride, int64_t key_stride,
                                    bool is_neox, cudaStream_t stream) {
  return dispatch<T, false>(positions, query, key, nullptr, cos_sin_cache, nullptr, nullptr,
                            nullptr, num_tokens, num_heads, num_kv_heads, head_size, rot_dim,
                            query_stride, key_stride, 0, is_neox, stream);
}

template <typename T>
cudaError_t rotary_embedding_and_cache_launch(
    const int64_t* positions, T* query, const T* key, const T* value, const float* cos_sin_cache,
    T* key_cache, T* value_cache, const int64_t* slot_mapping, const T* q_norm_weight,
    const T* k_norm_weight, float norm_eps, int64_t num_tokens, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_size, int64_t rot_dim, int64_t query_stride,
    int64_t key_stride, int64_t value_stride, bool is_neox, cudaStream_t stream) {
  if (q_norm_weight != nullptr) {
    if (num_tokens == 0) return cudaSuccess;
    FASTGEN_DISPATCH_BOOL(is_neox, IS_NEOX, [&] {
      rotary_norm_cache_kernel<T, IS_NEOX>
          <<<static_cast<unsigned>(num_tokens), kThreads, 0, stream>>>(
              positions, query, key, value, cos_sin_cache, key_cache, value_cache, slot_mapping,
              q_norm_weight, k_norm_weight, norm_eps, static_cast<int>(num_heads),
              static_cast<int>(num_kv_heads), static_cast<int>(head_size),
              static_cast<int>(rot_dim), query_stride, key_stride, value_stride);
    });
    return cudaGetLastError();
  }
  // The kernel only reads key when writing the cache; the cast keeps one kernel for both uses.
  return dispatch<T, true>(positions, query, const_cast<T*>(key), value, cos_sin_cache, key_cache,
                           value_cache, slot_mapping, num_tokens, num_heads, num_kv_heads,
                           head_size, rot_dim, query_stride, key_stride, value_stride, is_neox,
                           stream);
}

template <typename T>
cudaError_t mla_rotary_and_cache_launch(const int64_t* positions, T* query, const T* kv_a,
                                        const T* kv_norm_weight, float norm_eps,
                                        const float* cos_sin_cache, T* latent_cache,
                                        const int64_t* slot_mapping, int64_t num_tokens,
                                        int64_t num_heads, int64_t head_size,
                                        int64_t latent_size, int64_t rot_dim,
                                        int64_t query_stride, int64_t kv_a_stride, bool is_neox,
                                        cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  FASTGEN_DISPATCH_BOOL(is_neox, IS_NEOX, [&] {
    mla_rotary_cache_kernel<T, IS_NEOX><<<static_cast<unsigned>(num_tokens), kThreads, 0, stream>>>(
        positions, query, kv_a, kv_norm_weight, norm_eps, cos_sin_cache, latent_cache,
        slot_mapping, static_cast<int>(num_heads), static_cast<int>(head_size),
        static_cast<int>(latent_size), static_cast<int>(rot_dim), query_stride, kv_a_stride);
  });
  return cudaGetLastError();
}

#define FASTGEN_INSTANTIATE(T)                                                                 \
  template cudaError_t rotary_embedding_launch<T>(const int64_t*, T*, T*, const float*,       \
                                                  int64_t, int64_t, int64_t, int64_t, int64_t, \
                                                  int64_t, int64_t, bool, cudaStream_t);       \
  template cudaError_t rotary_embedding_and_cache_launch<T>(                                  \
      const int64_t*, T*, const T*, const T*, const float*, T*, T*, const int64_t*, const T*,  \
      const T*, float, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
      bool, cudaStream_t);                                                                     \
  template cudaError_t mla_rotary_and_cache_launch<T>(                                        \
      const int64_t*, T*, const T*, const T*, float, const float*, T*, const int64_t*, int64_t, \
      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, cudaStream_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(__half)
FASTGEN_INSTANTIATE(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox) {
  constexpr const char* op = "rotary_embedding";
  check_rotary_embedding_args(positions, query, key, head_size, cos_sin_cache);
  const int64_t num_tokens = positions.size(0), rot_dim = cos_sin_cache.size(1);
  const c10::cuda::CUDAGuard guard(query.device());
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    using T = cuda_type_t<scalar_t>;
    C10_CUDA_CHECK(rotary_embedding_launch<T>(
        positions.data_ptr<int64_t>(), reinterpret_cast<T*>(query.data_ptr()),
        reinterpret_cast<T*>(key.data_ptr()), cos_sin_cache.data_ptr<float>(), num_tokens,
        query.size(1) / head_size, key.size(1) / head_size, head_size, rot_dim, query.stride(0),
        key.stride(0), is_neox, c10::cuda::getCurrentCUDAStream()));
  });
}

void rotary_embedding_and_cache(const at::Tensor& positions, at::Tensor& query,
                                const at::Tensor& key, const at::Tensor& value, int64_t head_size,
                                const at::Tensor& cos_sin_cache, bool is_neox,
                                at::Tensor& key_cache, at::Tensor& value_cache,
                                const at::Tensor& slot_mapping,
                                const std::optional<at::Tensor>& q_norm_weight,
                                const std::optional<at::Tensor>& k_norm_weight, double norm_eps) {
  constexpr const char* op = "rotary_embedding_and_cache";
  check_rotary_embedding_and_cache_args(positions, query, key, value, head_size, cos_sin_cache,
                                        key_cache, value_cache, slot_mapping, q_norm_weight,
                                        k_norm_weight);
  const int64_t num_tokens = positions.size(0), rot_dim = cos_sin_cache.size(1);
  const c10::cuda::CUDAGuard guard(query.device());
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    using T = cuda_type_t<scalar_t>;
    const auto weight_ptr = [](const std::optional<at::Tensor>& w) {
      return w ? reinterpret_cast<const T*>(w->data_ptr()) : nullptr;
    };
    C10_CUDA_CHECK(rotary_embedding_and_cache_launch<T>(
        positions.data_ptr<int64_t>(), reinterpret_cast<T*>(query.data_ptr()),
        reinterpret_cast<const T*>(key.data_ptr()), reinterpret_cast<const T*>(value.data_ptr()),
        cos_sin_cache.data_ptr<float>(), reinterpret_cast<T*>(key_cache.data_ptr()),
        reinterpret_cast<T*>(value_cache.data_ptr()), slot_mapping.data_ptr<int64_t>(),
        weight_ptr(q_norm_weight), weight_ptr(k_norm_weight), static_cast<float>(norm_eps),
        num_tokens, query.size(1) / head_size, key.size(1) / head_size, head_size, rot_dim,
        query.stride(0), key.stride(0), value.stride(0), is_neox,
        c10::cuda::getCurrentCUDAStream()));
  });
}

void mla_rotary_and_cache(const at::Tensor& positions, at::Tensor& query, const at::Tensor& kv_a,
                          const at::Tensor& kv_norm_weight, double norm_eps, int64_t head_size,
                          const at::Tensor& cos_sin_cache, bool is_neox,
                          at::Tensor& latent_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "mla_rotary_and_cache";
  check_mla_rotary_and_cache_args(positions, query, kv_a, kv_norm_weight, head_size,
                                  cos_sin_cache, latent_cache, slot_mapping);
  const int64_t num_tokens = positions.size(0), rot_dim = cos_sin_cache.size(1);
  const c10::cuda::CUDAGuard guard(query.device());
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    using T = cuda_type_t<scalar_t>;
    C10_CUDA_CHECK(mla_rotary_and_cache_launch<T>(
        positions.data_ptr<int64_t>(), reinterpret_cast<T*>(query.data_ptr()),
        reinterpret_cast<const T*>(kv_a.data_ptr()),
        reinterpret_cast<const T*>(kv_norm_weight.data_ptr()), static_cast<float>(norm_eps),
        cos_sin_cache.data_ptr<float>(), reinterpret_cast<T*>(latent_cache.data_ptr()),
        slot_mapping.data_ptr<int64_t>(), num_tokens, query.size(1) / head_size, head_size,
        latent_cache.size(2) - rot_dim, rot_dim, query.stride(0), kv_a.stride(0), is_neox,
        c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace fastgen::cuda
