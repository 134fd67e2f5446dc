// fastgen_bench_kernels: times every kernel through its torch-free launcher (raw pointers, no
// at::Tensor) and prints latency, achieved GB/s, and the fraction of a copy bandwidth measured in
// the same run (memcpy on the CPU, device-to-device cudaMemcpy on the GPU).
//
//   build/dev/fastgen_bench_kernels                 # CPU kernels, bf16
//   build/dev/fastgen_bench_kernels --device cuda   # CUDA kernels (needs a GPU)
//
// The CPU run also times the decode linear layers (the CPU-only linear op; on GPUs it is cuBLAS).
// Sizes are the shapes the engine runs: SmolLM2-135M (H 576, 9/3 heads, D 64) and Llama-3-8B
// (H 4096, 32/8 heads, D 128), at decode (few tokens) and prefill (many tokens) batch sizes.
// Bytes counted are the bytes each kernel must read and write at least once.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "cpu/activation.h"
#include "cpu/attention.h"
#include "cpu/cache.h"
#include "cpu/linear.h"
#include "cpu/norm.h"
#include "cpu/rotary.h"

#ifdef FASTGEN_WITH_CUDA
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/activation.h"
#include "cuda/attention.h"
#include "cuda/cache.h"
#include "cuda/norm.h"
#include "cuda/rotary.h"
#endif

namespace {

enum class Device { kCpu, kCuda };

// A buffer of `count` elements of T on the chosen device, filled with small random values.
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
    if (device == Device::kCpu) {
      host_ = std::move(host);
      ptr_ = host_.data();
      return;
    }
#ifdef FASTGEN_WITH_CUDA
    cudaMalloc(&ptr_, count * sizeof(T));
    cudaMemcpy(ptr_, host.data(), count * sizeof(T), cudaMemcpyHostToDevice);
#endif
  }
  Buffer(Device device, const std::vector<T>& values) : Buffer(device, values.size(), false) {
    if (device == Device::kCpu) {
      host_ = values;
      ptr_ = host_.data();
      return;
    }
#ifdef FASTGEN_WITH_CUDA
    cudaMemcpy(ptr_, values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice);
#endif
  }
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
  Device device_;
  size_t count_;
  std::vector<T> host_;
  T* ptr_ = nullptr;
};

// Median time of fn in microseconds over enough repetitions to fill ~0.2 s.
double time_us(Device device, const std::function<void()>& fn) {
  auto now_us = [&] {
#ifdef FASTGEN_WITH_CUDA
    if (device == Device::kCuda) cudaDeviceSynchronize();
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

struct Reporter {
  double copy_gb_s = 0;
  void row(const std::string& kernel, const std::string& shape, double us, double bytes) const {
    const double gb_s = bytes / us / 1e3;
    std::printf("%-22s %-34s %10.2f us %9.1f GB/s %6.0f%%\n", kernel.c_str(), shape.c_str(), us,
                gb_s, 100.0 * gb_s / copy_gb_s);
  }
  void flops_row(const std::string& kernel, const std::string& shape, double us, double flops) const {
    std::printf("%-22s %-34s %10.2f us %7.2f TFLOP/s\n", kernel.c_str(), shape.c_str(), us, flops / us / 1e6);
  }
};

struct ModelShape {
  const char* name;
  int64_t hidden, inter, heads, kv_heads, head_dim;
};
constexpr ModelShape kShapes[] = {{"smollm2", 576, 1536, 9, 3, 64}, {"llama3-8b", 4096, 14336, 32, 8, 128}};

// A paged-attention problem: `batch` sequences of k_len cached keys, the last q_len of them
// queried, pages of 16 tokens laid out in a shuffled order.
struct AttentionProblem {
  int64_t batch, q_len, k_len;
  static constexpr int64_t kBlockSize = 16;
  int64_t blocks_per_seq() const { return (k_len + kBlockSize - 1) / kBlockSize; }
  std::vector<int32_t> cu_seqlens_q() const {
    std::vector<int32_t> cu(batch + 1);
    for (int64_t b = 0; b <= batch; ++b) cu[b] = static_cast<int32_t>(b * q_len);
    return cu;
  }
  std::vector<int32_t> block_tables() const {
    std::vector<int32_t> tables(batch * blocks_per_seq());
    std::iota(tables.begin(), tables.end(), 0);
    std::shuffle(tables.begin(), tables.end(), std::mt19937(0));
    return tables;
  }
  // Causal score + value FLOPs: each query sees (on average) its prefix of the keys.
  double flops(const ModelShape& m) const {
    const double keys_seen = q_len * (k_len - q_len) + q_len * (q_len + 1) / 2.0;
    return 4.0 * batch * m.heads * m.head_dim * keys_seen;
  }
};

// Read + write bandwidth of a plain 256 MiB copy: the roofline the kernels are measured against.
double copy_bandwidth(Device device) {
  const size_t bytes = size_t{256} << 20;
  Buffer<uint8_t> src(device, bytes, false), dst(device, bytes, false);
  double us;
  if (device == Device::kCpu) {
    us = time_us(device, [&] {
      at::parallel_for(0, bytes, 1 << 20, [&](int64_t begin, int64_t end) {
        std::memcpy(dst.get() + begin, src.get() + begin, end - begin);
      });
    });
  } else {
#ifdef FASTGEN_WITH_CUDA
    us = time_us(device, [&] { cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice); });
#endif
  }
  return 2.0 * bytes / us / 1e3;
}

// Each backend calls its own launchers; the cases in run_cases() are written once for both.
template <typename T>
struct CpuKernels {
  static constexpr Device device = Device::kCpu;
  void rms_norm(T* out, const T* in, const T* w, int64_t tokens, int64_t hidden) const {
    fastgen::cpu::rms_norm_launch<T>(out, in, w, 1e-5f, tokens, hidden, hidden);
  }
  void fused_add_rms_norm(T* in, T* res, const T* w, int64_t tokens, int64_t hidden) const {
    fastgen::cpu::fused_add_rms_norm_launch<T>(in, res, w, 1e-5f, tokens, hidden);
  }
  void silu_and_mul(T* out, const T* in, int64_t tokens, int64_t inter) const {
    fastgen::cpu::silu_and_mul_launch<T>(out, in, tokens, inter, 2 * inter);
  }
  void rotary(const int64_t* pos, T* q, T* k, const float* cache, int64_t tokens, const ModelShape& m) const {
    const int64_t qkv = (m.heads + 2 * m.kv_heads) * m.head_dim;  // q and k are slices of a fused qkv row
    fastgen::cpu::rotary_embedding_launch<T>(pos, q, k, cache, tokens, m.heads, m.kv_heads, m.head_dim,
                                             m.head_dim, qkv, qkv, true);
  }
  void cache(const T* k, const T* v, T* kc, T* vc, const int64_t* slots, int64_t tokens, int64_t,
             const ModelShape& m) const {
    const int64_t row = m.kv_heads * m.head_dim;
    fastgen::cpu::reshape_and_cache_launch<T>(k, v, kc, vc, slots, tokens, m.kv_heads, m.head_dim, row, row);
  }
  void rotary_and_cache(const int64_t* pos, T* qkv, const float* cache, T* kc, T* vc, const int64_t* slots,
                        int64_t tokens, int64_t, const ModelShape& m) const {
    const int64_t stride = (m.heads + 2 * m.kv_heads) * m.head_dim;
    T* k = qkv + m.heads * m.head_dim;
    fastgen::cpu::rotary_embedding_and_cache_launch<T>(pos, qkv, k, k + m.kv_heads * m.head_dim, cache, kc, vc,
                                                       slots, tokens, m.heads, m.kv_heads, m.head_dim,
                                                       m.head_dim, stride, stride, stride, true);
  }
  void attention(T* out, const T* q, const T* kc, const T* vc, const int32_t* cu_q, const int32_t* seq_k,
                 const int32_t* tables, const AttentionProblem& p, const ModelShape& m) const {
    fastgen::cpu::attention_launch<T>(out, q, kc, vc, cu_q, seq_k, tables, p.batch, m.heads, m.kv_heads,
                                      m.head_dim, p.kBlockSize, p.blocks_per_seq(), m.heads * m.head_dim,
                                      1.f / std::sqrt(static_cast<float>(m.head_dim)), std::nullopt, std::nullopt);
  }
};

#ifdef FASTGEN_WITH_CUDA
// Device floats that grow on demand (the decode kernel's split workspace).
class Workspace {
 public:
  ~Workspace() { cudaFree(ptr_); }
  void resize(int64_t count) {
    if (count <= count_) return;
    cudaFree(ptr_);
    cudaMalloc(&ptr_, count * sizeof(float));
    count_ = count;
  }
  float* get() const { return ptr_; }

 private:
  float* ptr_ = nullptr;
  int64_t count_ = 0;
};

template <typename T>
struct CudaKernels {
  mutable Workspace workspace_;
  static constexpr Device device = Device::kCuda;
  void rms_norm(T* out, const T* in, const T* w, int64_t tokens, int64_t hidden) const {
    fastgen::cuda::rms_norm_launch<T>(out, in, w, 1e-5f, tokens, hidden, hidden, nullptr);
  }
  void fused_add_rms_norm(T* in, T* res, const T* w, int64_t tokens, int64_t hidden) const {
    fastgen::cuda::fused_add_rms_norm_launch<T>(in, res, w, 1e-5f, tokens, hidden, nullptr);
  }
  void silu_and_mul(T* out, const T* in, int64_t tokens, int64_t inter) const {
    fastgen::cuda::silu_and_mul_launch<T>(out, in, tokens, inter, 2 * inter, nullptr);
  }
  void rotary(const int64_t* pos, T* q, T* k, const float* cache, int64_t tokens, const ModelShape& m) const {
    const int64_t qkv = (m.heads + 2 * m.kv_heads) * m.head_dim;
    fastgen::cuda::rotary_embedding_launch<T>(pos, q, k, cache, tokens, m.heads, m.kv_heads, m.head_dim,
                                              m.head_dim, qkv, qkv, true, nullptr);
  }
  void cache(const T* k, const T* v, T* kc, T* vc, const int64_t* slots, int64_t tokens, int64_t num_slots,
             const ModelShape& m) const {
    const int64_t row = m.kv_heads * m.head_dim;
    fastgen::cuda::reshape_and_cache_launch<T>(k, v, kc, vc, slots, tokens, num_slots, m.kv_heads, m.head_dim,
                                               row, row, nullptr);
  }
  void rotary_and_cache(const int64_t* pos, T* qkv, const float* cache, T* kc, T* vc, const int64_t* slots,
                        int64_t tokens, int64_t, const ModelShape& m) const {
    const int64_t stride = (m.heads + 2 * m.kv_heads) * m.head_dim;
    T* k = qkv + m.heads * m.head_dim;
    fastgen::cuda::rotary_embedding_and_cache_launch<T>(pos, qkv, k, k + m.kv_heads * m.head_dim, cache, kc, vc,
                                                        slots, tokens, m.heads, m.kv_heads, m.head_dim,
                                                        m.head_dim, stride, stride, stride, true, nullptr);
  }
  // Decode batches take the split-KV kernel, as the op does; its workspace is kept between calls.
  void attention(T* out, const T* q, const T* kc, const T* vc, const int32_t* cu_q, const int32_t* seq_k,
                 const int32_t* tables, const AttentionProblem& p, const ModelShape& m) const {
    const float scale = 1.f / std::sqrt(static_cast<float>(m.head_dim));
    auto launch = [&](auto head_dim) {
      constexpr int D = decltype(head_dim)::value;
      if (p.q_len == 1) {
        int sms = 0;
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
        const int splits = fastgen::cuda::decode_attention_num_splits<T, D>(p.batch, m.heads, m.kv_heads, p.k_len, sms);
        workspace_.resize(fastgen::cuda::decode_attention_workspace_floats(p.batch, m.heads, D, splits));
        fastgen::cuda::decode_attention_launch<T, D>(
            out, q, kc, vc, cu_q, seq_k, tables, workspace_.get(), p.batch, m.heads, m.kv_heads, p.kBlockSize,
            p.blocks_per_seq(), m.heads * m.head_dim, scale, std::nullopt, std::nullopt, splits, nullptr);
        return;
      }
      fastgen::cuda::attention_launch<T, D>(
          out, q, kc, vc, cu_q, seq_k, tables, p.batch * p.q_len, p.batch, m.heads, m.kv_heads, p.kBlockSize,
          p.blocks_per_seq(), m.heads * m.head_dim, scale, std::nullopt, std::nullopt, nullptr);
    };
    if (m.head_dim == 64) launch(std::integral_constant<int, 64>{});
    else launch(std::integral_constant<int, 128>{});
  }
};
#endif

// Decode (q_len 1) is reported as GB/s of KV cache read; prefill as TFLOP/s.
template <typename T, typename Kernels>
void run_attention_cases(const Kernels& kernels, const Reporter& report) {
  constexpr Device dev = Kernels::device;
  const std::vector<AttentionProblem> problems =
      dev == Device::kCpu
          ? std::vector<AttentionProblem>{{1, 1, 1024}, {1, 1, 8192}, {8, 1, 1024}, {1, 512, 512}, {1, 2048, 2048}}
          : std::vector<AttentionProblem>{{1, 1, 32768}, {64, 1, 2048}, {1, 2048, 2048}, {1, 8192, 8192}};
  for (const ModelShape& m : kShapes) {
    for (const AttentionProblem& p : problems) {
      const std::string shape = std::string(m.name) + ", " + std::to_string(p.batch) + " x " +
                                std::to_string(p.q_len) + "q/" + std::to_string(p.k_len) + "k";
      const int64_t tokens = p.batch * p.q_len, row = m.kv_heads * m.head_dim;
      const int64_t cache_rows = p.batch * p.blocks_per_seq() * p.kBlockSize;
      Buffer<T> q(dev, tokens * m.heads * m.head_dim), out(dev, tokens * m.heads * m.head_dim);
      Buffer<T> kc(dev, cache_rows * row), vc(dev, cache_rows * row);
      Buffer<int32_t> cu_q(dev, p.cu_seqlens_q()), seq_k(dev, std::vector<int32_t>(p.batch, p.k_len)),
          tables(dev, p.block_tables());
      const double us = time_us(dev, [&] {
        kernels.attention(out.get(), q.get(), kc.get(), vc.get(), cu_q.get(), seq_k.get(), tables.get(), p, m);
      });
      if (p.q_len == 1) {
        report.row("attention (decode)", shape, us, 2.0 * p.batch * p.k_len * row * sizeof(T));
      } else {
        report.flops_row("attention (prefill)", shape, us, p.flops(m));
      }
    }
  }
}

constexpr int64_t kMaxPosition = 8192;

std::vector<int64_t> positions(int64_t tokens) {
  std::vector<int64_t> pos(tokens);
  for (int64_t t = 0; t < tokens; ++t) pos[t] = t % kMaxPosition;
  return pos;
}

template <typename T, typename Kernels>
void run_cases(const Kernels& kernels, const Reporter& report) {
  constexpr Device dev = Kernels::device;
  const int64_t token_counts[] = {1, 8, 512, 4096};
  for (const ModelShape& m : kShapes) {
    for (int64_t tokens : token_counts) {
      const std::string shape = std::string(m.name) + ", " + std::to_string(tokens) + " tokens";
      const double e = sizeof(T);
      {  // norms: read x (and the residual), write the result (and the residual)
        Buffer<T> x(dev, tokens * m.hidden), res(dev, tokens * m.hidden), out(dev, tokens * m.hidden),
            w(dev, m.hidden);
        report.row("rms_norm", shape, time_us(dev, [&] { kernels.rms_norm(out.get(), x.get(), w.get(), tokens, m.hidden); }),
                   2.0 * tokens * m.hidden * e);
        report.row("fused_add_rms_norm", shape,
                   time_us(dev, [&] { kernels.fused_add_rms_norm(x.get(), res.get(), w.get(), tokens, m.hidden); }),
                   4.0 * tokens * m.hidden * e);
      }
      {  // silu_and_mul: read [T, 2I], write [T, I]
        Buffer<T> in(dev, tokens * 2 * m.inter), out(dev, tokens * m.inter);
        report.row("silu_and_mul", shape,
                   time_us(dev, [&] { kernels.silu_and_mul(out.get(), in.get(), tokens, m.inter); }),
                   3.0 * tokens * m.inter * e);
      }
      // rotary: positions 0, 1, ... (wrapping at kMaxPosition) and a cos / sin table
      Buffer<int64_t> pos(dev, positions(tokens));
      Buffer<float> cos_sin(dev, kMaxPosition * m.head_dim);
      {  // rotary: q and k heads read and written in place inside the fused qkv rows
        const int64_t qkv = (m.heads + 2 * m.kv_heads) * m.head_dim;
        Buffer<T> fused(dev, tokens * qkv);
        report.row("rotary_embedding", shape, time_us(dev, [&] {
                     kernels.rotary(pos.get(), fused.get(), fused.get() + m.heads * m.head_dim, cos_sin.get(), tokens, m);
                   }),
                   2.0 * tokens * (m.heads + m.kv_heads) * m.head_dim * e);
      }
      {  // reshape_and_cache: read k and v rows, write them to shuffled slots
        const int64_t row = m.kv_heads * m.head_dim, num_slots = std::max<int64_t>(tokens, 4096);
        std::vector<int64_t> slot_ids(num_slots);
        std::iota(slot_ids.begin(), slot_ids.end(), 0);
        std::shuffle(slot_ids.begin(), slot_ids.end(), std::mt19937(0));
        slot_ids.resize(tokens);
        Buffer<int64_t> slots(dev, slot_ids);
        Buffer<T> k(dev, tokens * row), v(dev, tokens * row), kc(dev, num_slots * row), vc(dev, num_slots * row);
        report.row("reshape_and_cache", shape, time_us(dev, [&] {
                     kernels.cache(k.get(), v.get(), kc.get(), vc.get(), slots.get(), tokens, num_slots, m);
                   }),
                   4.0 * tokens * row * e);
        // fused: q read and written in place, k and v read from the qkv rows, written to the cache
        Buffer<T> qkv(dev, tokens * (m.heads + 2 * m.kv_heads) * m.head_dim);
        report.row("rotary_and_cache", shape, time_us(dev, [&] {
                     kernels.rotary_and_cache(pos.get(), qkv.get(), cos_sin.get(), kc.get(), vc.get(), slots.get(),
                                              tokens, num_slots, m);
                   }),
                   (2.0 * m.heads * m.head_dim + 4.0 * row) * tokens * e);
      }
    }
  }
}

// CPU only (GPUs use cuBLAS): the decode GEMVs of each model, reported as GB/s of weight read.
// The weight is cycled through enough copies to exceed the last-level cache, as in a decode step,
// where every layer's weight comes from memory.
void run_linear_cases(const Reporter& report) {
  using T = c10::BFloat16;
  struct LinearShape {
    const char* name;
    int64_t in, out;
  };
  const std::pair<const char*, std::vector<LinearShape>> models[] = {
      {"smollm2", {{"qkv", 576, 960}, {"o", 576, 576}, {"gate_up", 576, 3072}, {"down", 1536, 576},
                   {"lm_head", 576, 49152}}},
      {"llama3-8b", {{"qkv", 4096, 6144}, {"o", 4096, 4096}, {"gate_up", 4096, 28672},
                     {"down", 14336, 4096}}},
  };
  constexpr size_t kColdBytes = size_t{256} << 20;
  for (const auto& [model, layers] : models) {
    for (const LinearShape& l : layers) {
      const size_t weight_bytes = l.in * l.out * sizeof(T);
      const int64_t copies = std::max<int64_t>(2, (kColdBytes + weight_bytes - 1) / weight_bytes);
      Buffer<T> weights(Device::kCpu, copies * l.in * l.out, false);
      for (int64_t tokens : {1, 8}) {
        Buffer<T> x(Device::kCpu, tokens * l.in), out(Device::kCpu, tokens * l.out);
        int64_t copy = 0;
        const double us = time_us(Device::kCpu, [&] {
          fastgen::cpu::linear_launch<T, T>(out.get(), x.get(), weights.get() + copy * l.in * l.out, nullptr,
                                            tokens, l.out, l.in, l.in);
          copy = (copy + 1) % copies;
        });
        const std::string shape = std::string(model) + " " + l.name + ", " + std::to_string(tokens) +
                                  " x " + std::to_string(l.in) + " -> " + std::to_string(l.out);
        report.row("linear", shape, us, static_cast<double>(weight_bytes));
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Device device = Device::kCpu;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--device" && i + 1 < argc) {
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
    } else {
      std::fprintf(stderr, "usage: fastgen_bench_kernels [--device cpu|cuda]\n");
      return 2;
    }
  }
  Reporter report;
  report.copy_gb_s = copy_bandwidth(device);
  std::printf("device %s, %d threads, bf16; copy bandwidth (read + write) %.1f GB/s\n",
              device == Device::kCpu ? "cpu" : "cuda", at::get_num_threads(), report.copy_gb_s);
  std::printf("%-22s %-34s %13s %14s %7s\n", "kernel", "shape", "latency", "achieved", "of copy");
  if (device == Device::kCpu) {
    run_cases<c10::BFloat16>(CpuKernels<c10::BFloat16>{}, report);
    run_attention_cases<c10::BFloat16>(CpuKernels<c10::BFloat16>{}, report);
    run_linear_cases(report);
  } else {
#ifdef FASTGEN_WITH_CUDA
    run_cases<__nv_bfloat16>(CudaKernels<__nv_bfloat16>{}, report);
    run_attention_cases<__nv_bfloat16>(CudaKernels<__nv_bfloat16>{}, report);
#endif
  }
  return 0;
}
