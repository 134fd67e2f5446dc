// rotary_embedding and the fused rotary_embedding_and_cache through their launchers, on the q and
// k slices of fused QKV rows (as the model calls them), at positions 0, 1, ... (wrapping at
// kMaxPosition) with a float32 cos / sin table. rotary_embedding reads and writes the q and k
// heads in place; the fused op also reads v and writes k and v to shuffled cache slots.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>

#include "cpu/rotary.h"
#include "harness.h"

#ifdef FASTGEN_WITH_CUDA
#include <cuda_bf16.h>

#include "cuda/rotary.h"
#endif

namespace fastgen::bench {

namespace {

constexpr int64_t kMaxPosition = 8192;
constexpr int64_t kMinSlots = 4096;  // cache slots the fused op writes into, at least

struct CpuRotary {
  using T = c10::BFloat16;
  static constexpr Device device = Device::kCpu;
  void rotary(const int64_t* pos, T* qkv, const float* cos_sin, int64_t tokens, const ModelShape& m) const {
    const QkvRows<T> rows = qkv_rows(qkv, m);
    cpu::rotary_embedding_launch<T>(pos, rows.q, rows.k, cos_sin, tokens, m.heads, m.kv_heads, m.head_dim,
                                    m.head_dim, rows.row_stride, rows.row_stride, true);
  }
  void rotary_and_cache(const int64_t* pos, T* qkv, const float* cos_sin, T* kc, T* vc, const int64_t* slots,
                        int64_t tokens, const ModelShape& m) const {
    const QkvRows<T> rows = qkv_rows(qkv, m);
    cpu::rotary_embedding_and_cache_launch<T>(pos, rows.q, rows.k, rows.v, cos_sin, kc, vc, slots, nullptr,
                                              nullptr, 0.f, tokens, m.heads,
                                              m.kv_heads, m.head_dim, m.head_dim, rows.row_stride,
                                              rows.row_stride, rows.row_stride, true);
  }
};

#ifdef FASTGEN_WITH_CUDA
struct CudaRotary {
  using T = __nv_bfloat16;
  static constexpr Device device = Device::kCuda;
  void rotary(const int64_t* pos, T* qkv, const float* cos_sin, int64_t tokens, const ModelShape& m) const {
    const QkvRows<T> rows = qkv_rows(qkv, m);
    check_cuda(cuda::rotary_embedding_launch<T>(pos, rows.q, rows.k, cos_sin, tokens, m.heads, m.kv_heads,
                                                m.head_dim, m.head_dim, rows.row_stride, rows.row_stride, true,
                                                nullptr),
               "rotary_embedding");
  }
  void rotary_and_cache(const int64_t* pos, T* qkv, const float* cos_sin, T* kc, T* vc, const int64_t* slots,
                        int64_t tokens, const ModelShape& m) const {
    const QkvRows<T> rows = qkv_rows(qkv, m);
    check_cuda(cuda::rotary_embedding_and_cache_launch<T>(pos, rows.q, rows.k, rows.v, cos_sin, kc, vc, slots,
                                                          nullptr, nullptr, 0.f, tokens, m.heads, m.kv_heads, m.head_dim, m.head_dim,
                                                          rows.row_stride, rows.row_stride, rows.row_stride,
                                                          true, nullptr),
               "rotary_embedding_and_cache");
  }
};
#endif

std::vector<int64_t> positions(int64_t tokens) {
  std::vector<int64_t> pos(tokens);
  for (int64_t t = 0; t < tokens; ++t) pos[t] = t % kMaxPosition;
  return pos;
}

template <typename Kernels>
void run(const Kernels& kernels, const Options& options, const Reporter& report) {
  using T = typename Kernels::T;
  constexpr Device dev = Kernels::device;
  for (const ModelShape& m : kModels) {
    for (int64_t tokens : token_counts(options)) {
      const std::string shape = std::string(m.name) + ", " + std::to_string(tokens) + " tokens";
      const double e = sizeof(T);
      Buffer<int64_t> pos(dev, positions(tokens));
      Buffer<float> cos_sin(dev, kMaxPosition * m.head_dim);
      Buffer<T> qkv(dev, tokens * m.qkv_width());
      report.row("rotary_embedding", shape,
                 time_us(dev, [&] { kernels.rotary(pos.get(), qkv.get(), cos_sin.get(), tokens, m); }),
                 2.0 * tokens * (m.heads + m.kv_heads) * m.head_dim * e);
      const int64_t num_slots = std::max(tokens, kMinSlots);
      Buffer<int64_t> slots(dev, shuffled_slots(tokens, num_slots));
      Buffer<T> kc(dev, num_slots * m.kv_width()), vc(dev, num_slots * m.kv_width());
      report.row("rotary_and_cache", shape, time_us(dev, [&] {
                   kernels.rotary_and_cache(pos.get(), qkv.get(), cos_sin.get(), kc.get(), vc.get(), slots.get(),
                                            tokens, m);
                 }),
                 (2.0 * m.q_width() + 4.0 * m.kv_width()) * tokens * e);
    }
  }
}

}  // namespace

void bench_rotary(Device device, const Options& options, const Reporter& report) {
#ifdef FASTGEN_WITH_CUDA
  if (device == Device::kCuda) return run(CudaRotary{}, options, report);
#endif
  run(CpuRotary{}, options, report);
}

}  // namespace fastgen::bench
