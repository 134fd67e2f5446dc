// reshape_and_cache through its launcher: it reads each token's k and v rows and writes them to
// shuffled slots of a cache of at least kMinSlots slots.
#include <algorithm>
#include <cstdint>
#include <string>

#include <c10/util/BFloat16.h>

#include "cpu/cache.h"
#include "harness.h"

#ifdef FASTGEN_WITH_CUDA
#include <cuda_bf16.h>

#include "cuda/cache.h"
#endif

namespace fastgen::bench {

namespace {

constexpr int64_t kMinSlots = 4096;

struct CpuCache {
  using T = c10::BFloat16;
  static constexpr Device device = Device::kCpu;
  void cache(const T* k, const T* v, T* kc, T* vc, const int64_t* slots, int64_t tokens, int64_t,
             const ModelShape& m) const {
    cpu::reshape_and_cache_launch<T>(k, v, kc, vc, slots, tokens, m.kv_heads, m.head_dim, m.kv_width(),
                                     m.kv_width());
  }
};

#ifdef FASTGEN_WITH_CUDA
struct CudaCache {
  using T = __nv_bfloat16;
  static constexpr Device device = Device::kCuda;
  void cache(const T* k, const T* v, T* kc, T* vc, const int64_t* slots, int64_t tokens, int64_t num_slots,
             const ModelShape& m) const {
    check_cuda(cuda::reshape_and_cache_launch<T>(k, v, kc, vc, slots, tokens, num_slots, m.kv_heads, m.head_dim,
                                                 m.kv_width(), m.kv_width(), nullptr),
               "reshape_and_cache");
  }
};
#endif

template <typename Kernels>
void run(const Kernels& kernels, const Options& options, const Reporter& report) {
  using T = typename Kernels::T;
  constexpr Device dev = Kernels::device;
  for (const ModelShape& m : kModels) {
    for (int64_t tokens : token_counts(options)) {
      const std::string shape = std::string(m.name) + ", " + std::to_string(tokens) + " tokens";
      const int64_t row = m.kv_width(), num_slots = std::max(tokens, kMinSlots);
      Buffer<int64_t> slots(dev, shuffled_slots(tokens, num_slots));
      Buffer<T> k(dev, tokens * row), v(dev, tokens * row), kc(dev, num_slots * row), vc(dev, num_slots * row);
      report.row("reshape_and_cache", shape, time_us(dev, [&] {
                   kernels.cache(k.get(), v.get(), kc.get(), vc.get(), slots.get(), tokens, num_slots, m);
                 }),
                 4.0 * tokens * row * sizeof(T));
    }
  }
}

}  // namespace

void bench_cache(Device device, const Options& options, const Reporter& report) {
#ifdef FASTGEN_WITH_CUDA
  if (device == Device::kCuda) return run(CudaCache{}, options, report);
#endif
  run(CpuCache{}, options, report);
}

}  // namespace fastgen::bench
