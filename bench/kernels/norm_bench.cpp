// rms_norm and fused_add_rms_norm through their launchers, at every model's hidden size and token
// count: they read x (and the residual) and write the result (and the residual).
#include <cstdint>
#include <string>

#include <c10/util/BFloat16.h>

#include "cpu/norm.h"
#include "harness.h"

#ifdef FASTGEN_WITH_CUDA
#include <cuda_bf16.h>

#include "cuda/norm.h"
#endif

namespace fastgen::bench {

namespace {

constexpr float kEpsilon = 1e-5f;

struct CpuNorms {
  using T = c10::BFloat16;
  static constexpr Device device = Device::kCpu;
  void rms_norm(T* out, const T* in, const T* w, int64_t tokens, int64_t hidden) const {
    cpu::rms_norm_launch<T>(out, in, w, kEpsilon, tokens, hidden, hidden);
  }
  void fused_add_rms_norm(T* in, T* res, const T* w, int64_t tokens, int64_t hidden) const {
    cpu::fused_add_rms_norm_launch<T>(in, res, w, kEpsilon, tokens, hidden);
  }
};

#ifdef FASTGEN_WITH_CUDA
struct CudaNorms {
  using T = __nv_bfloat16;
  static constexpr Device device = Device::kCuda;
  void rms_norm(T* out, const T* in, const T* w, int64_t tokens, int64_t hidden) const {
    check_cuda(cuda::rms_norm_launch<T>(out, in, w, kEpsilon, tokens, hidden, hidden, nullptr), "rms_norm");
  }
  void fused_add_rms_norm(T* in, T* res, const T* w, int64_t tokens, int64_t hidden) const {
    check_cuda(cuda::fused_add_rms_norm_launch<T>(in, res, w, kEpsilon, tokens, hidden, nullptr),
               "fused_add_rms_norm");
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
      const double bytes = static_cast<double>(tokens * m.hidden * sizeof(T));  // one [T, H] pass
      Buffer<T> x(dev, tokens * m.hidden), res(dev, tokens * m.hidden), out(dev, tokens * m.hidden),
          w(dev, m.hidden);
      report.row("rms_norm", shape,
                 time_us(dev, [&] { kernels.rms_norm(out.get(), x.get(), w.get(), tokens, m.hidden); }),
                 2 * bytes);
      report.row("fused_add_rms_norm", shape,
                 time_us(dev, [&] { kernels.fused_add_rms_norm(x.get(), res.get(), w.get(), tokens, m.hidden); }),
                 4 * bytes);
    }
  }
}

}  // namespace

void bench_norms(Device device, const Options& options, const Reporter& report) {
#ifdef FASTGEN_WITH_CUDA
  if (device == Device::kCuda) return run(CudaNorms{}, options, report);
#endif
  run(CpuNorms{}, options, report);
}

}  // namespace fastgen::bench
