// The shared parts of the kernel microbenchmarks (see harness.h): the clock, the copy bandwidth,
// the report rows and the case lists.
#include "harness.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include <ATen/Parallel.h>

namespace fastgen::bench {

#ifdef FASTGEN_WITH_CUDA
void check_cuda(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return;
  std::fprintf(stderr, "fastgen_bench_kernels: %s failed: %s\n", what, cudaGetErrorString(error));
  std::exit(1);
}
#endif

double time_us(Device device, const std::function<void()>& fn) {
  auto now_us = [&] {
#ifdef FASTGEN_WITH_CUDA
    if (device == Device::kCuda) check_cuda(cudaDeviceSynchronize(), "a timed kernel");
#endif
    return std::chrono::duration<double, std::micro>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
  };
  fn();  // warm-up
  double start = now_us();
  fn();
  const double once = std::max(now_us() - start, 1.0);
  const int reps = std::clamp(static_cast<int>(200000.0 / once / 5), 1, 1000);
  std::vector<double> samples;
  for (int s = 0; s < 5; ++s) {
    start = now_us();
    for (int r = 0; r < reps; ++r) fn();
    samples.push_back((now_us() - start) / reps);
  }
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

double copy_bandwidth(Device device) {
  const size_t bytes = size_t{256} << 20;
  Buffer<uint8_t> src(device, bytes, false), dst(device, bytes, false);
  double us = 0;
  if (device == Device::kCpu) {
    us = time_us(device, [&] {
      at::parallel_for(0, bytes, 1 << 20, [&](int64_t begin, int64_t end) {
        std::memcpy(dst.get() + begin, src.get() + begin, end - begin);
      });
    });
  } else {
#ifdef FASTGEN_WITH_CUDA
    us = time_us(device, [&] {
      check_cuda(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice), "cudaMemcpyAsync");
    });
#endif
  }
  return 2.0 * bytes / us / 1e3;
}

void Reporter::header() const {
  std::printf("%-24s %-34s %13s %14s %7s\n", "kernel", "shape", "latency", "achieved", "of copy");
}

void Reporter::row(const std::string& kernel, const std::string& shape, double us, double bytes) const {
  const double gb_s = bytes / us / 1e3;
  std::printf("%-24s %-34s %10.2f us %9.1f GB/s %6.0f%%\n", kernel.c_str(), shape.c_str(), us, gb_s,
              100.0 * gb_s / copy_gb_s);
}

void Reporter::flops_row(const std::string& kernel, const std::string& shape, double us, double flops) const {
  std::printf("%-24s %-34s %10.2f us %7.2f TFLOP/s\n", kernel.c_str(), shape.c_str(), us, flops / us / 1e6);
}

std::vector<int64_t> token_counts(const Options& options) {
  if (options.quick) return {1, 8};
  return {1, 8, 512, 4096};
}

std::vector<int64_t> shuffled_slots(int64_t tokens, int64_t num_slots) {
  std::vector<int64_t> slots(num_slots);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937(0));
  slots.resize(tokens);
  return slots;
}

}  // namespace fastgen::bench
