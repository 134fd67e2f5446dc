// Paged KV cache writes on the CPU: each token's [Hkv, D] key and value rows are copied whole
// (one memcpy each) into their slot. Tokens are split across torch's thread pool only when each
// task gets enough bytes to pay for the hand-off (decode batches of a few tokens run inline).
// key / value may be row slices of the fused qkv tensor, so rows are addressed by their strides.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cpu/cache.h"
#include "ops.h"

namespace fastgen::cpu {

namespace {

// Below this many bytes copied per task, threading costs more than it saves.
constexpr int64_t kMinBytesPerTask = 64 * 1024;

}  // namespace

template <typename T>
void reshape_and_cache_launch(const T* key, const T* value, T* key_cache, T* value_cache,
                              const int64_t* slot_mapping, int64_t num_tokens,
                              int64_t num_kv_heads, int64_t head_size, int64_t key_stride,
                              int64_t value_stride) {
  const int64_t row = num_kv_heads * head_size;
  const int64_t row_bytes = std::max<int64_t>(row * static_cast<int64_t>(sizeof(T)), 1);
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / (2 * row_bytes));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slot_mapping[t];
      if (slot < 0) continue;  // padding
      std::memcpy(key_cache + slot * row, key + t * key_stride, row * sizeof(T));
      std::memcpy(value_cache + slot * row, value + t * value_stride, row * sizeof(T));
    }
  });
}

#define FASTGEN_INSTANTIATE(T)                                                                  \
  template void reshape_and_cache_launch<T>(const T*, const T*, T*, T*, const int64_t*,       \
                                            int64_t, int64_t, int64_t, int64_t, int64_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(c10::Half)
FASTGEN_INSTANTIATE(c10::BFloat16)
#undef FASTGEN_INSTANTIATE

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "reshape_and_cache";
  check_reshape_and_cache_args(key, value, key_cache, value_cache, slot_mapping);
  // Slots are on the host, so their range is checked here too (the copy trusts them).
  check_slot_values(op, slot_mapping, key_cache.size(0) * key_cache.size(1));
  FASTGEN_DISPATCH_FLOAT(key.scalar_type(), op, [&] {
    reshape_and_cache_launch<scalar_t>(
        key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(),
        value_cache.data_ptr<scalar_t>(), slot_mapping.data_ptr<int64_t>(), key.size(0),
        key.size(1), key.size(2), key.stride(0), value.stride(0));
  });
}

}  // namespace fastgen::cpu
