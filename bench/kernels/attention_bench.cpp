// Paged attention through the launcher the op calls, so each row times what the op runs: on the
// CPU cpu::attention_launch (which plans the batch and picks the bf16 or float32 kernels), on the
// GPU cuda::attention_launch (which picks the decode, tensor-core or plain kernel; the row names
// the one that ran). Decode (q_len 1) is reported as GB/s of KV cache read, prefill as TFLOP/s.
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>

#include "cpu/attention.h"
#include "harness.h"

#ifdef FASTGEN_WITH_CUDA
#include <cuda_bf16.h>

#include "cuda/attention.h"
#endif

namespace fastgen::bench {

namespace {

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

float scale_of(const ModelShape& m) { return 1.f / std::sqrt(static_cast<float>(m.head_dim)); }

// attention(...) runs the problem and returns the name of the kernel that ran, when the launcher
// tells.
struct CpuAttention {
  using T = c10::BFloat16;
  static constexpr Device device = Device::kCpu;
  static std::vector<AttentionProblem> problems(const Options& options) {
    if (options.quick) return {{1, 1, 1024}, {1, 512, 512}};
    return {{1, 1, 1024}, {1, 1, 8192}, {8, 1, 1024}, {1, 512, 512}, {1, 2048, 2048}};
  }
  std::optional<std::string> attention(T* out, const T* q, const T* kc, const T* vc, const int32_t* cu_q,
                                       const int32_t* seq_k, const int32_t* tables, const AttentionProblem& p,
                                       const ModelShape& m) const {
    cpu::attention_launch<T>(out, q, kc, vc, cu_q, seq_k, tables, p.batch, m.heads, m.kv_heads, m.head_dim,
                             m.head_dim, p.kBlockSize, p.blocks_per_seq(), m.q_width(), scale_of(m), std::nullopt,
                             std::nullopt);
    return std::nullopt;
  }
};

#ifdef FASTGEN_WITH_CUDA
// Device floats that grow on demand (the decode kernel's split workspace).
class Workspace {
 public:
  ~Workspace() { cudaFree(ptr_); }
  float* get(int64_t count) {
    if (count > count_) {
      check_cuda(cudaFree(ptr_), "cudaFree");
      check_cuda(cudaMalloc(&ptr_, count * sizeof(float)), "cudaMalloc");
      count_ = count;
    }
    return ptr_;
  }

 private:
  float* ptr_ = nullptr;
  int64_t count_ = 0;
};

struct CudaAttention {
  using T = __nv_bfloat16;
  static constexpr Device device = Device::kCuda;
  mutable Workspace workspace;
  static std::vector<AttentionProblem> problems(const Options& options) {
    if (options.quick) return {{1, 1, 2048}, {1, 2048, 2048}};
    return {{1, 1, 32768}, {64, 1, 2048}, {1, 2048, 2048}, {1, 8192, 8192}};
  }
  std::optional<std::string> attention(T* out, const T* q, const T* kc, const T* vc, const int32_t* cu_q,
                                       const int32_t* seq_k, const int32_t* tables, const AttentionProblem& p,
                                       const ModelShape& m) const {
    cuda::AttentionKernel kernel = cuda::AttentionKernel::kPlain;
    check_cuda(cuda::attention_launch(out, q, kc, vc, cu_q, seq_k, tables, DType::kBFloat16, p.batch * p.q_len,
                                      p.batch, m.heads, m.kv_heads, m.head_dim, p.kBlockSize, p.blocks_per_seq(),
                                      p.q_len, p.k_len, m.q_width(), scale_of(m), std::nullopt, std::nullopt,
                                      [&](int64_t floats) { return workspace.get(floats); }, nullptr, &kernel),
               "attention");
    return cuda::attention_kernel_name(kernel);
  }
};
#endif

template <typename Kernels>
void run(const Kernels& kernels, const Options& options, const Reporter& report) {
  using T = typename Kernels::T;
  constexpr Device dev = Kernels::device;
  for (const ModelShape& m : kModels) {
    for (const AttentionProblem& p : Kernels::problems(options)) {
      const std::string shape = std::string(m.name) + ", " + std::to_string(p.batch) + " x " +
                                std::to_string(p.q_len) + "q/" + std::to_string(p.k_len) + "k";
      const int64_t tokens = p.batch * p.q_len;
      const int64_t cache_rows = p.batch * p.blocks_per_seq() * p.kBlockSize;
      Buffer<T> q(dev, tokens * m.q_width()), out(dev, tokens * m.q_width());
      Buffer<T> kc(dev, cache_rows * m.kv_width()), vc(dev, cache_rows * m.kv_width());
      Buffer<int32_t> cu_q(dev, p.cu_seqlens_q()), seq_k(dev, std::vector<int32_t>(p.batch, p.k_len)),
          tables(dev, p.block_tables());
      std::optional<std::string> kernel;
      const double us = time_us(dev, [&] {
        kernel = kernels.attention(out.get(), q.get(), kc.get(), vc.get(), cu_q.get(), seq_k.get(), tables.get(), p, m);
      });
      const std::string name = p.q_len == 1 ? "decode" : "prefill";
      const std::string label = "attention (" + kernel.value_or(name) + ")";
      if (p.q_len == 1) {
        report.row(label, shape, us, 2.0 * p.batch * p.k_len * m.kv_width() * sizeof(T));
      } else {
        report.flops_row(label, shape, us, p.flops(m));
      }
    }
  }
}

}  // namespace

void bench_attention(Device device, const Options& options, const Reporter& report) {
#ifdef FASTGEN_WITH_CUDA
  if (device == Device::kCuda) return run(CudaAttention{}, options, report);
#endif
  run(CpuAttention{}, options, report);
}

}  // namespace fastgen::bench
