// fastgen_bench_kernels: times every kernel through its torch-free launcher (raw pointers, no
// at::Tensor) and prints latency, achieved GB/s, and the fraction of a copy bandwidth measured in
// the same run (memcpy on the CPU, device-to-device cudaMemcpy on the GPU).
//
//   build/dev/fastgen_bench_kernels                   # CPU kernels, bf16
//   build/dev/fastgen_bench_kernels --device cuda     # CUDA kernels (needs a GPU)
//   build/dev/fastgen_bench_kernels --quick           # the smallest cases: a check that all run
//
// One file per kernel family (<family>_bench.cpp, over harness.h). The CPU run also times the
// decode linear layers (the CPU-only linear op; on GPUs it is cuBLAS). Sizes are the shapes the
// engine runs: SmolLM2-135M (H 576, 9/3 heads, D 64) and Llama-3-8B (H 4096, 32/8 heads, D 128),
// at decode (few tokens) and prefill (many tokens) batch sizes. Bytes counted are the bytes each
// kernel must read and write at least once.
#include <cstdio>
#include <string>

#include <ATen/Parallel.h>

#include "harness.h"

int main(int argc, char** argv) {
  using namespace fastgen::bench;
  Device device = Device::kCpu;
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--device" && i + 1 < argc) {
      const std::string name = argv[++i];
      if (name == "cuda") {
#ifdef FASTGEN_WITH_CUDA
        device = Device::kCuda;
#else
        std::fprintf(stderr, "fastgen_bench_kernels: built without CUDA\n");
        return 2;
#endif
      } else if (name != "cpu") {
        std::fprintf(stderr, "fastgen_bench_kernels: unknown device %s (cpu or cuda)\n", name.c_str());
        return 2;
      }
    } else if (arg == "--quick") {
      options.quick = true;
    } else {
      std::fprintf(stderr, "usage: fastgen_bench_kernels [--device cpu|cuda] [--quick]\n");
      return 2;
    }
  }
  Reporter report;
  report.copy_gb_s = copy_bandwidth(device);
  std::printf("device %s, %d threads, bf16; copy bandwidth (read + write) %.1f GB/s\n",
              device == Device::kCpu ? "cpu" : "cuda", at::get_num_threads(), report.copy_gb_s);
  report.header();
  bench_norms(device, options, report);
  bench_activation(device, options, report);
  bench_rotary(device, options, report);
  bench_cache(device, options, report);
  bench_attention(device, options, report);
  if (device == Device::kCpu) bench_linear(options, report);
  return 0;
}
