// The attention mask every kernel applies, CPU and CUDA alike, written once: the query at position
// pos (counted in its sequence's cached keys) sees keys [first_visible_key(pos, window, chunk),
// pos]: causal, within the sliding window (the last `window` keys, itself included) and within its
// local-attention chunk (the aligned run of `chunk` keys holding pos). A missing window or chunk is
// kUnbounded, so the rule needs no branch: pos - kUnbounded + 1 <= 0 and pos / kUnbounded == 0.
//
//   const int64_t window = sliding_window.value_or(kUnbounded);   // std::optional<int64_t>
//   for (int64_t j = first_visible_key(pos, window, chunk); j <= pos; ++j) ...
//
// Scores are kept in the log2 domain (q.k * scale * kLog2e, then exp2), in every kernel.
// Compiled by nvcc (host and device) and by the host compiler.
#pragma once

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define FASTGEN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTGEN_HOST_DEVICE inline
#endif

namespace fastgen {

// A window or chunk that is not given.
constexpr int64_t kUnbounded = std::numeric_limits<int64_t>::max();

// log2(e): exp(x) = exp2(x * kLog2e).
constexpr float kLog2e = 1.4426950408889634f;

// max(0, pos - window + 1, pos / chunk * chunk); 0 for pos < 0 (a sequence with no key).
FASTGEN_HOST_DEVICE int64_t first_visible_key(int64_t pos, int64_t window, int64_t chunk) {
  const int64_t window_start = pos - window + 1;
  const int64_t chunk_start = pos / chunk * chunk;
  const int64_t first = window_start > 0 ? window_start : 0;
  return chunk_start > first ? chunk_start : first;
}

}  // namespace fastgen
