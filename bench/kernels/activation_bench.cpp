// silu_and_mul through its launcher, at every model's intermediate size and token count: it reads
// [T, 2I] and writes [T, I].
#include <cstdint>
#include <string>

#include <c10/util/BFloat16.h>

#include "cpu/activation.h"
#include "harness.h"

#ifdef FASTGEN_WITH_CUDA
#include <cuda_bf16.h>

#include "cuda/activation.h"
#endif

namespace fastgen::bench {

namespace {

struct CpuActivation {
  using T = c10::BFloat16;
  static constexpr Device device = Device::kCpu;
  void silu_and_mul(T* out, const T* in, int64_t tokens, int64_t inter) const {
    cpu::silu_and_mul_launch<T>(out, in, tokens, inter, 2 * inter);
  }
};

#ifdef FASTGEN_WITH_CUDA
struct CudaActivation {
  using T = __nv_bfloat16;
  static constexpr Device device = Device::kCuda;
  void silu_and_mul(T* out, const T* in, int64_t tokens, int64_t inter) const {
    check_cuda(cuda::silu_and_mul_launch<T>(out, in, tokens, inter, 2 * inter, nullptr), "silu_and_mul");
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
      Buffer<T> in(dev, tokens * 2 * m.inter), out(dev, tokens * m.inter);
      report.row("silu_and_mul", shape,
                 time_us(dev, [&] { kernels.silu_and_mul(out.get(), in.get(), tokens, m.inter); }),
                 3.0 * tokens * m.inter * sizeof(T));
    }
  }
}

}  // namespace

void bench_activation(Device device, const Options& options, const Reporter& report) {
#ifdef FASTGEN_WITH_CUDA
  if (device == Device::kCuda) return run(CudaActivation{}, options, report);
#endif
  run(CpuActivation{}, options, report);
}

}  // namespace fastgen::bench
