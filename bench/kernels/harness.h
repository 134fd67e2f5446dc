// What the kernel microbenchmarks in bench/kernels share: the device, device buffers of random
// values, the clock, the report rows, the model shapes (with the fused-QKV row layout), and the
// copy bandwidth every row is read against. Each <family>_bench.cpp times its family's torch-free
// launchers with raw pointers, the CPU and the CUDA ones from one list of cases; bench_kernels.cpp
// runs them all. Every family runs in bf16.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#ifdef FASTGEN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fastgen::bench {

enum class Device { kCpu, kCuda };

#ifdef FASTGEN_WITH_CUDA
// Exits naming `what` and the error unless error is cudaSuccess: a benchmark has nothing to
// recover, and a failed launch must not be timed as a fast one.
void check_cuda(cudaError_t error, const char* what);
#endif

// A buffer of `count` elements of T on the chosen device, filled with small random values (or
// copied from `values`).
template <typename T>
class Buffer {
 public:
  Buffer(Device device, size_t count, bool randomize = true) : device_(device), count_(count) {
    std::vector<T> host(count);
    if (randomize) {
      std::mt19937 rng(static_cast<unsigned>(count));
      std::normal_distribution<float> dist(0.f, 1.f);
      for (auto& v : host) v = static_cast<T>(dist(rng));
    }
    init(host);
  }
  Buffer(Device device, const std::vector<T>& values) : device_(device), count_(values.size()) { init(values); }
  ~Buffer() {
#ifdef FASTGEN_WITH_CUDA
    if (device_ == Device::kCuda) cudaFree(ptr_);
#endif
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return ptr_; }
  size_t bytes() const { return count_ * sizeof(T); }

 private:
  void init(const std::vector<T>& host) {
    if (device_ == Device::kCpu) {
      host_ = host;
      ptr_ = host_.data();
      return;
    }
#ifdef FASTGEN_WITH_CUDA
    check_cuda(cudaMalloc(&ptr_, bytes()), "cudaMalloc");
    check_cuda(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice), "cudaMemcpy");
#endif
  }

  Device device_;
  size_t count_;
  std::vector<T> host_;
  T* ptr_ = nullptr;
};

// Median time of fn in microseconds over enough repetitions to fill ~0.2 s (the device's queue
// drained before each reading).
double time_us(Device device, const std::function<void()>& fn);

// Read + write bandwidth of a plain 256 MiB copy (memcpy on the CPU, device-to-device on the
// GPU): the roofline the kernels are measured against.
double copy_bandwidth(Device device);

struct Options {
  bool quick = false;  // the smallest cases only: a check that every kernel runs
};

struct Reporter {
  double copy_gb_s = 0;
  void header() const;
  void row(const std::string& kernel, const std::string& shape, double us, double bytes) const;
  void flops_row(const std::string& kernel, const std::string& shape, double us, double flops) const;
};

// The shapes the engine runs. A fused QKV projection's row is [q | k | v]: heads * head_dim, then
// kv_heads * head_dim twice.
struct ModelShape {
  const char* name;
  int64_t hidden, inter, heads, kv_heads, head_dim, vocab;
  int64_t q_width() const { return heads * head_dim; }
  int64_t kv_width() const { return kv_heads * head_dim; }
  int64_t qkv_width() const { return q_width() + 2 * kv_width(); }
};
inline constexpr ModelShape kModels[] = {
    {"smollm2", 576, 1536, 9, 3, 64, 49152},           // SmolLM2-135M
    {"llama3-8b", 4096, 14336, 32, 8, 128, 128256},  // Llama-3-8B
};

// The q, k and v slices of `tokens` fused QKV rows (each row_stride = qkv_width() apart).
template <typename T>
struct QkvRows {
  T *q, *k, *v;
  int64_t row_stride;
};
template <typename T>
QkvRows<T> qkv_rows(T* qkv, const ModelShape& m) {
  return {qkv, qkv + m.q_width(), qkv + m.q_width() + m.kv_width(), m.qkv_width()};
}

// Tokens per call of the per-token families (norms, activation, rotary, cache): decode and
// prefill batch sizes.
std::vector<int64_t> token_counts(const Options& options);

// `tokens` distinct slots of a cache of num_slots, in shuffled order.
std::vector<int64_t> shuffled_slots(int64_t tokens, int64_t num_slots);

// The families (one file each).
void bench_norms(Device device, const Options& options, const Reporter& report);       // norm_bench.cpp
void bench_activation(Device device, const Options& options, const Reporter& report);  // activation_bench.cpp
void bench_rotary(Device device, const Options& options, const Reporter& report);      // rotary_bench.cpp
void bench_cache(Device device, const Options& options, const Reporter& report);       // cache_bench.cpp
void bench_attention(Device device, const Options& options, const Reporter& report);   // attention_bench.cpp
void bench_linear(const Options& options, const Reporter& report);  // linear_bench.cpp, CPU only

}  // namespace fastgen::bench
