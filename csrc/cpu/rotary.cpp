// Rotary position embedding on the CPU, in place on query and key. Each token's cos / sin row is
// read once and applied to all of its query and key heads; token rows are split across torch's
// thread pool only when each task gets enough work to pay for the hand-off (decode batches of a
// few tokens run inline). query and key may be column slices of one fused qkv tensor, so rows
// are addressed through their own strides. The layout (neox or GPT-J) is a template parameter;
// neox rows, two contiguous halves, are rotated with the fp32 SIMD helpers of cpu/vec.h. The
// cache-writing variant can also RMS-normalise each query and key head before rotating it
// (Qwen3's and Llama 4's q/k norm), with the row operations of the rms_norm op, so the fused
// result is bitwise that of rms_norm followed by the rotation.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cpu/norm_row.h"
#include "cpu/rotary.h"
#include "cpu/vec.h"
#include "ops.h"

namespace fastgen::cpu {

namespace {

// Below this many rotated elements per task, threading costs more than it saves.
constexpr int64_t kMinElementsPerTask = 16384;

// Rotates the first 2 * half dims of each of num_heads heads of one token row.
template <typename T, bool IS_NEOX>
inline void rotate_heads(T* __restrict__ x,              // [num_heads, head_size]
                         const float* __restrict__ cos,  // [half]
                         const float* __restrict__ sin,  // [half]
                         int64_t num_heads, int64_t head_size, int64_t half) {
  if constexpr (IS_NEOX) {
    // The pairs (i, i + half) are two contiguous runs: rotate them kWidth pairs at a time.
    using namespace vec;
    for (int64_t h = 0; h < num_heads; ++h) {
      T* xa = x + h * head_size;
      T* xb = xa + half;
      int64_t i = 0;
      for (; i + kWidth <= half; i += kWidth) {
        const Vec a = load(xa + i), b = load(xb + i), c = load(cos + i), s = load(sin + i);
        store(xa + i, a * c - b * s);
        store(xb + i, b * c + a * s);
      }
      if (i < half) {
        const int64_t n = half - i;
        const Vec a = load(xa + i, n), b = load(xb + i, n);
        const Vec c = load(cos + i, n), s = load(sin + i, n);
        store(xa + i, a * c - b * s, n);
        store(xb + i, b * c + a * s, n);
      }
    }
  } else {
    // GPT-J interleaves the pairs (2i, 2i + 1); a scalar loop, left to the compiler.
    for (int64_t h = 0; h < num_heads; ++h) {
      T* head = x + h * head_size;
      for (int64_t i = 0; i < half; ++i) {
        const float xa = static_cast<float>(head[2 * i]);
        const float xb = static_cast<float>(head[2 * i + 1]);
        head[2 * i] = static_cast<T>(xa * cos[i] - xb * sin[i]);
        head[2 * i + 1] = static_cast<T>(xb * cos[i] + xa * sin[i]);
      }
    }
  }
}

// RMS-normalises each of num_heads heads of one token row in place (weight: [head_size]).
template <typename T>
inline void normalize_heads(T* x, const T* weight, float epsilon, int64_t num_heads,
                            int64_t head_size) {
  for (int64_t h = 0; h < num_heads; ++h) {
    norm_row::normalize(x + h * head_size, weight, epsilon, head_size);
  }
}

// Runs body(t, cos, sin, neox) for every token t, split over torch's thread pool only where each
// task gets kMinElementsPerTask of work (elements_per_token each): cos and sin are the halves of
// the token's cos_sin_cache row, neox a std::bool_constant of the pair layout.
template <typename Body>
void for_each_token(const int64_t* positions, const float* cos_sin_cache, int64_t rot_dim,
                    int64_t num_tokens, int64_t elements_per_token, bool is_neox, Body&& body) {
  const int64_t grain =
      std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(elements_per_token, 1));
  FASTGEN_DISPATCH_BOOL(is_neox, IS_NEOX, [&] {
    at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* cos = cos_sin_cache + positions[t] * rot_dim;
        body(t, cos, cos + rot_dim / 2, std::bool_constant<IS_NEOX>{});
      }
    });
  });
}

}  // namespace

template <typename T>
void rotary_embedding_launch(const int64_t* positions, T* query, T* key,
                             const float* cos_sin_cache, int64_t num_tokens, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_size, int64_t rot_dim,
                             int64_t query_stride, int64_t key_stride, bool is_neox) {
  const int64_t half = rot_dim / 2;
  const int64_t per_token = (num_heads + num_kv_heads) * rot_dim;
  for_each_token(positions, cos_sin_cache, rot_dim, num_tokens, per_token, is_neox,
                 [&](int64_t t, const float* cos, const float* sin, auto neox) {
    constexpr bool IS_NEOX = decltype(neox)::value;
    rotate_heads<T, IS_NEOX>(query + t * query_stride, cos, sin, num_heads, head_size, half);
    rotate_heads<T, IS_NEOX>(key + t * key_stride, cos, sin, num_kv_heads, head_size, half);
  });
}

#define FASTGEN_INSTANTIATE(T)                                                                 \
  template void rotary_embedding_launch<T>(const int64_t*, T*, T*, const float*, int64_t,     \
                                           int64_t, int64_t, int64_t, int64_t, int64_t,       \
                                           int64_t, bool);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(c10::Half)
FASTGEN_INSTANTIATE(c10::BFloat16)
#undef FASTGEN_INSTANTIATE

template <typename T>
void rotary_embedding_and_cache_launch(const int64_t* positions, T* query, const T* key,
                                       const T* value, const float* cos_sin_cache, T* key_cache,
                                       T* value_cache, const int64_t* slot_mapping,
                                       const T* q_norm_weight, const T* k_norm_weight,
                                       float norm_eps, int64_t num_tokens, int64_t num_heads,
                                       int64_t num_kv_heads, int64_t head_size, int64_t rot_dim,
                                       int64_t query_stride, int64_t key_stride,
                                       int64_t value_stride, bool is_neox) {
  const int64_t half = rot_dim / 2, row = num_kv_heads * head_size;
  const bool qk_norm = q_norm_weight != nullptr;
  const int64_t per_token =
      (num_heads + num_kv_heads) * (qk_norm ? 2 * head_size : rot_dim) + 2 * row;
  for_each_token(positions, cos_sin_cache, rot_dim, num_tokens, per_token, is_neox,
                 [&](int64_t t, const float* cos, const float* sin, auto neox) {
    constexpr bool IS_NEOX = decltype(neox)::value;
    T* q = query + t * query_stride;
    if (qk_norm) normalize_heads(q, q_norm_weight, norm_eps, num_heads, head_size);
    rotate_heads<T, IS_NEOX>(q, cos, sin, num_heads, head_size, half);
    const int64_t slot = slot_mapping[t];
    if (slot < 0) return;  // padding
    // The key row is copied to its slot and normalised and rotated there: the cache row is the
    // only copy.
    T* k_out = key_cache + slot * row;
    std::memcpy(k_out, key + t * key_stride, row * sizeof(T));
    if (qk_norm) normalize_heads(k_out, k_norm_weight, norm_eps, num_kv_heads, head_size);
    rotate_heads<T, IS_NEOX>(k_out, cos, sin, num_kv_heads, head_size, half);
    std::memcpy(value_cache + slot * row, value + t * value_stride, row * sizeof(T));
  });
}

#define FASTGEN_INSTANTIATE(T)                                                                  \
  template void rotary_embedding_and_cache_launch<T>(                                          \
      const int64_t*, T*, const T*, const T*, const float*, T*, T*, const int64_t*, const T*,  \
      const T*, float, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, \
      bool);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(c10::Half)
FASTGEN_INSTANTIATE(c10::BFloat16)
#undef FASTGEN_INSTANTIATE

template <typename T>
void mla_rotary_and_cache_launch(const int64_t* positions, T* query, const T* kv_a,
                                 const T* kv_norm_weight, float norm_eps,
                                 const float* cos_sin_cache, T* latent_cache,
                                 const int64_t* slot_mapping, int64_t num_tokens,
                                 int64_t num_heads, int64_t head_size, int64_t latent_size,
                                 int64_t rot_dim, int64_t query_stride, int64_t kv_a_stride,
                                 bool is_neox) {
  const int64_t half = rot_dim / 2, row = latent_size + rot_dim;
  for_each_token(positions, cos_sin_cache, rot_dim, num_tokens, num_heads * rot_dim + 3 * row,
                 is_neox, [&](int64_t t, const float* cos, const float* sin, auto neox) {
    constexpr bool IS_NEOX = decltype(neox)::value;
    // The rotary part is the last rot_dim of each query head (DeepSeek's layout).
    rotate_heads<T, IS_NEOX>(query + t * query_stride + head_size - rot_dim, cos, sin, num_heads,
                             head_size, half);
    const int64_t slot = slot_mapping[t];
    if (slot < 0) return;  // padding
    // [latent | k_pe] copied to its slot, then normalised and rotated there.
    T* out = latent_cache + slot * row;
    std::memcpy(out, kv_a + t * kv_a_stride, row * sizeof(T));
    norm_row::normalize(out, kv_norm_weight, norm_eps, latent_size);
    rotate_heads<T, IS_NEOX>(out + latent_size, cos, sin, 1, rot_dim, half);
  });
}

#define FASTGEN_INSTANTIATE(T)                                                                  \
  template void mla_rotary_and_cache_launch<T>(const int64_t*, T*, const T*, const T*, float,  \
                                               const float*, T*, const int64_t*, int64_t,      \
                                               int64_t, int64_t, int64_t, int64_t, int64_t,    \
                                               int64_t, bool);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(c10::Half)
FASTGEN_INSTANTIATE(c10::BFloat16)
#undef FASTGEN_INSTANTIATE

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      int64_t head_size, const at::Tensor& cos_sin_cache, bool is_neox) {
  constexpr const char* op = "rotary_embedding";
  check_rotary_embedding_args(positions, query, key, head_size, cos_sin_cache);
  // Positions are on the host, so their range is checked here too (the kernels trust them).
  check_position_values(op, positions, cos_sin_cache.size(0));
  const int64_t num_tokens = positions.size(0), rot_dim = cos_sin_cache.size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    rotary_embedding_launch<scalar_t>(pos, query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(),
                                      cos_sin_cache.data_ptr<float>(), num_tokens,
                                      query.size(1) / head_size, key.size(1) / head_size,
                                      head_size, rot_dim, query.stride(0), key.stride(0),
                                      is_neox);
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
  // Positions and slots are on the host, so their ranges are checked here too.
  check_position_values(op, positions, cos_sin_cache.size(0));
  check_slot_values(op, slot_mapping, key_cache.size(0) * key_cache.size(1));
  const int64_t num_tokens = positions.size(0), rot_dim = cos_sin_cache.size(1);
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    rotary_embedding_and_cache_launch<scalar_t>(
        positions.data_ptr<int64_t>(), query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(),
        value.data_ptr<scalar_t>(), cos_sin_cache.data_ptr<float>(),
        key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>(),
        slot_mapping.data_ptr<int64_t>(),
        q_norm_weight ? q_norm_weight->data_ptr<scalar_t>() : nullptr,
        k_norm_weight ? k_norm_weight->data_ptr<scalar_t>() : nullptr,
        static_cast<float>(norm_eps), num_tokens, query.size(1) / head_size,
        key.size(1) / head_size, head_size, rot_dim, query.stride(0), key.stride(0),
        value.stride(0), is_neox);
  });
}

void mla_rotary_and_cache(const at::Tensor& positions, at::Tensor& query, const at::Tensor& kv_a,
                          const at::Tensor& kv_norm_weight, double norm_eps, int64_t head_size,
                          const at::Tensor& cos_sin_cache, bool is_neox,
                          at::Tensor& latent_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "mla_rotary_and_cache";
  check_mla_rotary_and_cache_args(positions, query, kv_a, kv_norm_weight, head_size,
                                  cos_sin_cache, latent_cache, slot_mapping);
  check_position_values(op, positions, cos_sin_cache.size(0));
  check_slot_values(op, slot_mapping, latent_cache.size(0) * latent_cache.size(1));
  const int64_t num_tokens = positions.size(0), rot_dim = cos_sin_cache.size(1);
  FASTGEN_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    mla_rotary_and_cache_launch<scalar_t>(
        positions.data_ptr<int64_t>(), query.data_ptr<scalar_t>(), kv_a.data_ptr<scalar_t>(),
        kv_norm_weight.data_ptr<scalar_t>(), static_cast<float>(norm_eps),
        cos_sin_cache.data_ptr<float>(), latent_cache.data_ptr<scalar_t>(),
        slot_mapping.data_ptr<int64_t>(), num_tokens, query.size(1) / head_size, head_size,
        latent_cache.size(2) - rot_dim, rot_dim, query.stride(0), kv_a.stride(0), is_neox);
  });
}

}  // namespace fastgen::cpu
