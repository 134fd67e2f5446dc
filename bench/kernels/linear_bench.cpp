// The decode GEMVs of each model through the CPU linear launcher (GPUs use cuBLAS), reported as
// GB/s of weight read. The weight is cycled through enough copies to exceed the last-level cache,
// as in a decode step, where every layer's weight comes from memory.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>

#include "cpu/linear.h"
#include "harness.h"

namespace fastgen::bench {

namespace {

constexpr size_t kColdBytes = size_t{256} << 20;  // weights cycled through per shape, at least

struct LinearShape {
  const char* name;
  int64_t in, out;
};

// A layer's projections: fused qkv, o, fused gate_up, down, and the lm_head when its weight fits
// in kColdBytes (Llama-3's 1 GiB would need two copies).
std::vector<LinearShape> linear_shapes(const ModelShape& m) {
  std::vector<LinearShape> shapes = {{"qkv", m.hidden, m.qkv_width()}, {"o", m.q_width(), m.hidden},
                                     {"gate_up", m.hidden, 2 * m.inter}, {"down", m.inter, m.hidden}};
  if (m.hidden * m.vocab * sizeof(c10::BFloat16) <= kColdBytes) shapes.push_back({"lm_head", m.hidden, m.vocab});
  return shapes;
}

}  // namespace

void bench_linear(const Options& options, const Reporter& report) {
  using T = c10::BFloat16;
  for (const ModelShape& m : kModels) {
    for (const LinearShape& l : linear_shapes(m)) {
      const size_t weight_bytes = l.in * l.out * sizeof(T);
      const int64_t copies = std::max<int64_t>(2, (kColdBytes + weight_bytes - 1) / weight_bytes);
      Buffer<T> weights(Device::kCpu, copies * l.in * l.out, false);
      for (int64_t tokens : options.quick ? std::vector<int64_t>{1} : std::vector<int64_t>{1, 8}) {
        Buffer<T> x(Device::kCpu, tokens * l.in), out(Device::kCpu, tokens * l.out);
        int64_t copy = 0;
        const double us = time_us(Device::kCpu, [&] {
          cpu::linear_launch<T, T>(out.get(), x.get(), weights.get() + copy * l.in * l.out, nullptr, tokens, l.out,
                                   l.in, l.in);
          copy = (copy + 1) % copies;
        });
        const std::string shape = std::string(m.name) + " " + l.name + ", " + std::to_string(tokens) + " x " +
                                  std::to_string(l.in) + " -> " + std::to_string(l.out);
        report.row("linear", shape, us, static_cast<double>(weight_bytes));
      }
    }
  }
}

}  // namespace fastgen::bench
