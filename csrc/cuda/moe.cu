// Mixture-of-experts on the GPU: routing, the alignment of (token, slot) pairs to experts, and the
// grouped SwiGLU expert MLP with a deterministic sum over the k slots. The kernels:
//   * moe_route_kernel: one warp per token. Scores (softmax with warp max / sum, or sigmoid) and
//     selection keys live in shared memory; the group limit ranks groups one lane per group and
//     keeps the best by warp argmax; then k rounds of warp argmax over the eligible experts, ties
//     to the lower index (a strict order on (key, -index), so every lane agrees).
//   * moe_align_kernel: one block of 16 warps, vLLM's moe_align_block_size made stable. Each warp
//     owns a contiguous range of pairs and counts its pairs per expert in shared memory
//     (__match_any_sync groups the lanes of one expert; the lowest adds the group's size, so no
//     atomics); a scan gives each expert's padded start and each (expert, warp) its base; a second
//     pass writes every pair at base + its rank among the expert's earlier lanes. The result is
//     the same as the CPU's sequential counting sort, bit for bit.
//   * moe_gemv_kernel (decode, tiles of kGemvTokens pairs): a CTA takes one tile (one active
//     expert) and kGemvWarps * kGemvRows output rows; each warp streams its rows with 16-byte loads
//     (lane l reads elements 8l.. of each 256-element step), multiplies them with the tile's
//     tokens (read from L1 / L2: a few rows), and reduces across lanes once at the end. For gate /
//     up a warp reads the gate row and the up row of the same outputs and applies SiLU-and-mul.
//   * moe_mma_kernel (prefill, tiles of 64 pairs): one launch per projection over (tile, 64-column
//     block), mma.sync m16n8k16 with fp32 accumulators, 4 warps in 2 x 2 of 32 x 32. A's rows are
//     gathered straight from x (row = pair / k) or the activations (row = pair) with cp.async,
//     zero-filled past the tile's pairs and K; B is the expert's weight rows [N, K], which is
//     already mma's "col" layout; both double-buffered in XOR-swizzled shared memory and read with
//     ldmatrix. For gate / up the CTA's 64 weight rows are 16 gate rows then the 16 up rows of the
//     same columns, twice, so each thread holds the gate and up sums of the same outputs and
//     applies SiLU-and-mul in registers.
//   * moe_combine_kernel: out[t] = sum over j in slot order of w_j * y[t * k + j], fp32 FMAs.
// Both projections write each pair's row of their output at its pair index (vLLM's layout), so no
// inverse permutation is needed, and nothing is summed with atomics: a token's output depends only
// on its own rows, on a given path (the GEMV or the GEMM).
#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>

#include "core/dispatch.h"
#include "core/op_checks.h"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/moe.h"
#include "ops.h"

namespace fastgen::cuda {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// ---- routing ------------------------------------------------------------------------------------

constexpr int kRouteWarps = 4;
constexpr int kNoExpert = INT_MAX;  // an empty argmax candidate: loses to every real one

// Bytes of shared memory per warp: scores and keys [E], group keys [G] (float), eligible [E] and
// kept [G] flags (bytes), rounded up to 16.
inline int route_smem_per_warp(int64_t num_experts, int64_t num_groups) {
  const int64_t bytes = (2 * num_experts + num_groups) * 4 + num_experts + num_groups;
  return static_cast<int>((bytes + 15) / 16 * 16);
}

// Whether (v, i) ranks before (best_v, best_i): a larger key, or an equal key and a lower index.
__device__ __forceinline__ bool ranks_before(float v, int i, float best_v, int best_i) {
  return i != kNoExpert && (best_i == kNoExpert || v > best_v || (v == best_v && i < best_i));
}

// Every lane gets the warp's best (v, i).
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_v = __shfl_xor_sync(kFullMask, v, offset);
    const int other_i = __shfl_xor_sync(kFullMask, i, offset);
    if (ranks_before(other_v, other_i, v, i)) {
      v = other_v;
      i = other_i;
    }
  }
}

__global__ void __launch_bounds__(kRouteWarps * 32)
moe_route_kernel(float* __restrict__ topk_weights,          // [num_tokens, k]
                 int32_t* __restrict__ topk_ids,            // [num_tokens, k]
                 const float* __restrict__ router_logits,   // [num_tokens, E], rows logits_stride apart
                 const float* __restrict__ correction_bias, // [E], or nullptr
                 int64_t num_tokens, int64_t logits_stride, MoeRouting routing, int smem_per_warp) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= num_tokens) return;  // the whole warp; the kernel has no block-wide barrier
  const int num_experts = static_cast<int>(routing.num_experts);
  const int num_groups = static_cast<int>(routing.num_groups);
  const int top_k = static_cast<int>(routing.top_k);
  float* scores = reinterpret_cast<float*>(smem_raw + warp * smem_per_warp);  // [E]
  float* keys = scores + num_experts;                                          // [E]
  float* group_keys = keys + num_experts;                                      // [G]
  uint8_t* eligible = reinterpret_cast<uint8_t*>(group_keys + num_groups);     // [E]
  uint8_t* group_kept = eligible + num_experts;                                // [G]
  const float* logits = router_logits + t * logits_stride;

  if (routing.scoring == MoeScoring::kSoftmax) {
    float max = -INFINITY;
    for (int e = lane; e < num_experts; e += 32) max = fmaxf(max, logits[e]);
    max = warp_max(max);
    const float shift = isinf(max) ? 0.f : max;
    float sum = 0.f;
    for (int e = lane; e < num_experts; e += 32) {
      const float s = expf(logits[e] - shift);
      scores[e] = s;
      sum += s;
    }
    sum = warp_sum(sum);
    for (int e = lane; e < num_experts; e += 32) scores[e] /= sum;
  } else {
    for (int e = lane; e < num_experts; e += 32) scores[e] = 1.f / (1.f + expf(-logits[e]));
  }
  for (int e = lane; e < num_experts; e += 32) {
    const float key = correction_bias ? scores[e] + correction_bias[e] : scores[e];
    keys[e] = isnan(key) ? -INFINITY : key;  // NaN ranks as -inf
  }
  __syncwarp();

  if (num_groups > 1) {
    const int group_size = num_experts / num_groups;
    for (int g = lane; g < num_groups; g += 32) {
      float best = -INFINITY, second = -INFINITY;
      for (int i = 0; i < group_size; ++i) {
        const float v = keys[g * group_size + i];
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      group_keys[g] = routing.group_scoring == MoeGroupScoring::kMax ? best : best + second;
      group_kept[g] = 0;
    }
    for (int e = lane; e < num_experts; e += 32) eligible[e] = 0;
    __syncwarp();
    for (int round = 0; round < routing.topk_groups; ++round) {
      float best_v = -INFINITY;
      int best_g = kNoExpert;
      for (int g = lane; g < num_groups; g += 32)
        if (!group_kept[g] && ranks_before(group_keys[g], g, best_v, best_g)) {
          best_v = group_keys[g];
          best_g = g;
        }
      warp_argmax(best_v, best_g);
      for (int i = lane; i < group_size; i += 32) eligible[best_g * group_size + i] = 1;
      if (lane == 0) group_kept[best_g] = 1;
      __syncwarp();
    }
  } else {
    for (int e = lane; e < num_experts; e += 32) eligible[e] = 1;
    __syncwarp();
  }

  float* weights = topk_weights + t * top_k;
  int32_t* ids = topk_ids + t * top_k;
  float sum = 0.f;  // lane 0's, in slot order
  for (int j = 0; j < top_k; ++j) {
    float best_v = -INFINITY;
    int best_e = kNoExpert;
    for (int e = lane; e < num_experts; e += 32)
      if (eligible[e] && ranks_before(keys[e], e, best_v, best_e)) {
        best_v = keys[e];
        best_e = e;
      }
    warp_argmax(best_v, best_e);
    if (lane == 0) {
      eligible[best_e] = 0;
      ids[j] = best_e;
      weights[j] = scores[best_e];
      sum += scores[best_e];
    }
    __syncwarp();
  }
  if (lane == 0) {
    for (int j = 0; j < top_k; ++j)
      weights[j] = (routing.renormalize ? weights[j] / sum : weights[j]) * routing.scale;
  }
}

// ---- alignment ----------------------------------------------------------------------------------

constexpr int kAlignWarps = 16, kAlignThreads = kAlignWarps * 32;

inline int align_smem_bytes(int64_t num_experts) {
  return static_cast<int>((kAlignWarps * num_experts + num_experts + 1) * sizeof(int32_t));
}

__global__ void __launch_bounds__(kAlignThreads)
moe_align_kernel(int32_t* __restrict__ sorted_ids,      // [padded_pairs]
                 int32_t* __restrict__ expert_offsets,  // [E + 1]
                 int32_t* __restrict__ tile_experts,    // [max_tiles]
                 const int32_t* __restrict__ topk_ids,  // [num_pairs]
                 int num_pairs, int num_experts, int block_size, int padded_pairs, int max_tiles) {
  extern __shared__ int32_t align_smem[];
  int32_t* counts = align_smem;                         // [kAlignWarps, E]: then each one's base
  int32_t* starts = counts + kAlignWarps * num_experts;  // [E + 1]: the padded runs' starts
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int i = tid; i < kAlignWarps * num_experts; i += kAlignThreads) counts[i] = 0;
  __syncthreads();

  // Warp w's pairs: [begin, end), a whole number of 32-pair steps per warp but the last.
  const int per_warp = ((num_pairs + kAlignWarps - 1) / kAlignWarps + 31) / 32 * 32;
  const int begin = warp * per_warp, end = min(begin + per_warp, num_pairs);
  int32_t* mine = counts + warp * num_experts;
  // The lane's expert, or -1 (no pair, or an id outside [0, E)).
  auto expert_of = [&](int p) {
    const int e = p < end ? topk_ids[p] : -1;
    return e >= 0 && e < num_experts ? e : -1;
  };
  for (int base = begin; base < end; base += 32) {  // the trip count is the warp's: uniform
    const int e = expert_of(base + lane);
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(peers) - 1) mine[e] += __popc(peers);
    __syncwarp();
  }
  __syncthreads();

  // Each expert's padded size, then their exclusive scan (warp 0, 32 experts per step).
  for (int e = tid; e < num_experts; e += kAlignThreads) {
    int total = 0;
    for (int w = 0; w < kAlignWarps; ++w) total += counts[w * num_experts + e];
    starts[e + 1] = (total + block_size - 1) / block_size * block_size;
  }
  __syncthreads();
  if (warp == 0) {
    int carry = 0;
    if (lane == 0) starts[0] = 0;
    for (int e0 = 0; e0 < num_experts; e0 += 32) {
      const int e = e0 + lane;
      int v = e < num_experts ? starts[e + 1] : 0;
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(kFullMask, v, offset);
        if (lane >= offset) v += other;
      }
      if (e < num_experts) starts[e + 1] = carry + v;
      carry += __shfl_sync(kFullMask, v, 31);
    }
  }
  __syncthreads();

  // (expert, warp) bases in warp order; each run's padding; the offsets out.
  for (int e = tid; e < num_experts; e += kAlignThreads) {
    int running = starts[e];
    for (int w = 0; w < kAlignWarps; ++w) {
      const int count = counts[w * num_experts + e];
      counts[w * num_experts + e] = running;
      running += count;
    }
    for (int i = running; i < starts[e + 1]; ++i) sorted_ids[i] = num_pairs;
    expert_offsets[e] = starts[e];
  }
  if (tid == 0) expert_offsets[num_experts] = starts[num_experts];
  __syncthreads();

  // Every pair at its (expert, warp) base + its rank among the expert's lanes before it.
  for (int base = begin; base < end; base += 32) {
    const int p = base + lane;
    const int e = expert_of(p);
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int slot = e >= 0 ? mine[e] + __popc(peers & ((1u << lane) - 1u)) : 0;
    __syncwarp();  // every lane has read its base before the lowest lane moves it
    if (e >= 0) {
      sorted_ids[slot] = p;
      if (lane == __ffs(peers) - 1) mine[e] += __popc(peers);
    }
    __syncwarp();
  }

  // Past the last run; then the expert of every tile (the last e whose run starts at or before
  // the tile: runs of empty experts have no tiles).
  const int total = starts[num_experts];
  for (int i = total + tid; i < padded_pairs; i += kAlignThreads) sorted_ids[i] = num_pairs;
  for (int tile = tid; tile < max_tiles; tile += kAlignThreads) {
    const int pos = tile * block_size;
    if (pos >= total) {
      tile_experts[tile] = -1;
      continue;
    }
    int lo = 0, hi = num_experts - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (starts[mid] <= pos) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    tile_experts[tile] = lo;
  }
}

// ---- the decode-size grouped GEMV ---------------------------------------------------------------

constexpr int kGemvTokens = 8;  // pairs per tile (moe_align's block_size on this path)
constexpr int kGemvWarps = 4, kGemvRows = 4;  // a warp's output rows; a CTA's: 16

// out[pair, row] for the tile's pairs and this warp's rows: GATED, silu(a * gate) * (a * up) of
// weight rows row and n + row (a the pair's weight when pair_weights is given, else 1); else the
// plain sum.
template <typename T, int VEC, bool GATED>
__global__ void __launch_bounds__(kGemvWarps * 32)
moe_gemv_kernel(T* __restrict__ out,                      // [P, n]
                const T* __restrict__ input,              // [P / input_div, k]: row pair / input_div
                const T* __restrict__ weight,             // [E, GATED ? 2n : n, k]
                const float* __restrict__ pair_weights,   // [P] (GATED, weight on the input), or nullptr
                const int32_t* __restrict__ sorted_ids,   // from moe_align, block_size kGemvTokens
                const int32_t* __restrict__ tile_experts,
                const int32_t* __restrict__ expert_offsets,
                int num_experts, int num_pairs, int input_div, int64_t n, int64_t k) {
  const int tile = blockIdx.x;
  if (tile * kGemvTokens >= expert_offsets[num_experts]) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.y) * kGemvWarps + warp) * kGemvRows;
  if (row0 >= n) return;  // the whole warp; no block-wide barrier
  const T* w = weight + static_cast<int64_t>(tile_experts[tile]) * (GATED ? 2 : 1) * n * k;
  // The tile's pairs: its first `count` entries (a run's padding comes last).
  int pair[kGemvTokens];
  int count = 0;
#pragma unroll
  for (int m = 0; m < kGemvTokens; ++m) {
    pair[m] = sorted_ids[tile * kGemvTokens + m];
    count += pair[m] < num_pairs;
  }
  float gate[kGemvRows][kGemvTokens] = {}, up[kGemvRows][kGemvTokens] = {};
  for (int64_t j = static_cast<int64_t>(lane) * VEC; j < k; j += 32 * VEC) {
    Vec<T, VEC> a[kGemvTokens];
#pragma unroll
    for (int m = 0; m < kGemvTokens; ++m)
      if (m < count) a[m] = Vec<T, VEC>::load(input + static_cast<int64_t>(pair[m] / input_div) * k + j);
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
      if (row0 + r >= n) continue;
      const auto wg = Vec<T, VEC>::load(w + (row0 + r) * k + j);
      Vec<T, VEC> wu;
      if constexpr (GATED) wu = Vec<T, VEC>::load(w + (n + row0 + r) * k + j);
#pragma unroll
      for (int m = 0; m < kGemvTokens; ++m) {
        if (m >= count) continue;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          gate[r][m] = fmaf(wg.f(e), a[m].f(e), gate[r][m]);
          if constexpr (GATED) up[r][m] = fmaf(wu.f(e), a[m].f(e), up[r][m]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
#pragma unroll
    for (int m = 0; m < kGemvTokens; ++m) {
      if (m >= count) continue;  // count is the warp's: the shuffles stay uniform
      const float g = warp_sum(gate[r][m]);
      const float u = GATED ? warp_sum(up[r][m]) : 0.f;
      if (lane != 0 || row0 + r >= n) continue;
      float v = g;
      if constexpr (GATED) {
        const float a = pair_weights ? pair_weights[pair[m]] : 1.f;
        v = silu(a * g) * (a * u);
      }
      out[static_cast<int64_t>(pair[m]) * n + row0 + r] = from_float<T>(v);
    }
  }
}

// ---- the prefill-size grouped GEMM on tensor cores -------------------------------------------------

constexpr int kMmaBlockM = 64, kMmaBlockN = 64, kMmaBlockK = 64, kMmaThreads = 128;

// out[pair, col] for a tile of kMmaBlockM pairs and a block of columns (GATED: 32 activation
// columns, from 64 weight rows; else 64), as moe_gemv_kernel computes them.
template <typename T, bool GATED>
__global__ void __launch_bounds__(kMmaThreads)
moe_mma_kernel(T* __restrict__ out,                      // [P, n]
               const T* __restrict__ input,              // [P / input_div, k]: row pair / input_div
               const T* __restrict__ weight,             // [E, GATED ? 2n : n, k]
               const float* __restrict__ pair_weights,   // [P] (GATED, weight on the input), or nullptr
               const int32_t* __restrict__ sorted_ids,   // from moe_align, block_size kMmaBlockM
               const int32_t* __restrict__ tile_experts,
               const int32_t* __restrict__ expert_offsets,
               int num_experts, int num_pairs, int input_div, int64_t n, int64_t k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync on bf16 needs sm_80; fused_moe_launch never launches this on older GPUs
#else
  using Smem = Smem64<T>;
  constexpr int kOutCols = GATED ? kMmaBlockN / 2 : kMmaBlockN;
  constexpr int kLoads = kMmaBlockM * Smem::kChunks / kMmaThreads;  // chunks per thread per tile: 4
  __shared__ __align__(128) T s_a[2][kMmaBlockM * Smem::kCols];
  __shared__ __align__(128) T s_b[2][kMmaBlockN * Smem::kCols];
  __shared__ int32_t s_pair[kMmaBlockM];

  const int tile = blockIdx.x;
  if (tile * kMmaBlockM >= expert_offsets[num_experts]) return;  // the whole CTA
  const int64_t expert = tile_experts[tile];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / 2, warp_n = warp % 2;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kOutCols;
  if (tid < kMmaBlockM) s_pair[tid] = sorted_ids[tile * kMmaBlockM + tid];
  __syncthreads();

  // This thread copies chunk c of rows tid / 8 + 16 i (i < kLoads) of both tiles. B's shared row
  // sr holds, GATED: for half h = sr / 32, gate rows then up rows (sr % 32 < 16 or not) of columns
  // n0 + 16 h + sr % 16; else weight row n0 + sr.
  const int c = tid % Smem::kChunks;
  const T* a_src[kLoads];
  const T* b_src[kLoads];
  bool a_valid[kLoads], b_valid[kLoads];
  const T* w = weight + expert * (GATED ? 2 : 1) * n * k;
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int row = tid / Smem::kChunks + i * (kMmaThreads / Smem::kChunks);
    const int pair = s_pair[row];
    a_valid[i] = pair < num_pairs;
    a_src[i] = input + (a_valid[i] ? static_cast<int64_t>(pair / input_div) * k : 0) + c * 8;
    int64_t col, w_row;
    if constexpr (GATED) {
      col = n0 + (row / 32) * 16 + row % 16;
      w_row = (row % 32 < 16) ? col : n + col;
    } else {
      col = n0 + row;
      w_row = col;
    }
    b_valid[i] = col < n;
    b_src[i] = w + (b_valid[i] ? w_row * k : 0) + c * 8;
  }
  auto load_tile = [&](int kt, int buf) {
    const int64_t k0 = static_cast<int64_t>(kt) * kMmaBlockK;
    const bool k_valid = k0 + c * 8 < k;  // k % 8 == 0: a chunk is all in or all out
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int row = tid / Smem::kChunks + i * (kMmaThreads / Smem::kChunks);
      cp_async_16(Smem::chunk(s_a[buf], row, c), a_src[i] + k0, a_valid[i] && k_valid);
      cp_async_16(Smem::chunk(s_b[buf], row, c), b_src[i] + k0, b_valid[i] && k_valid);
    }
  };

  // Warp (warp_m, warp_n): rows 32 warp_m.. (two m16 tiles) x B rows 32 warp_n.. (four n8 tiles).
  float acc[2][4][4] = {};
  const int k_tiles = static_cast<int>((k + kMmaBlockK - 1) / kMmaBlockK);
  load_tile(0, 0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int buf = kt % 2;
    if (kt + 1 < k_tiles) load_tile(kt + 1, buf ^ 1);
    cp_async_commit();
#pragma unroll
    for (int ks = 0; ks < kMmaBlockK / 16; ++ks) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int row = warp_m * 32 + mt * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        ldmatrix_x4(a[mt], Smem::chunk(s_a[buf], row, ks * 2 + lane / 16));
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];  // b[0], b[1]: n-tile 2 np; b[2], b[3]: 2 np + 1
        const int row = warp_n * 32 + np * 16 + (lane % 8) + (lane / 16) * 8;
        ldmatrix_x4(b, Smem::chunk(s_b[buf], row, ks * 2 + (lane / 8) % 2));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
          mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();  // the next tile is in, and nobody reads this buffer any more
  }

  // Accumulator e of an m16n8 tile: row lane / 4 (+ 8 for e >= 2), column 2 (lane % 4) + e % 2.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int pair = s_pair[warp_m * 32 + mt * 16 + lane / 4 + 8 * h];
      if (pair >= num_pairs) continue;
      T* out_row = out + static_cast<int64_t>(pair) * n;
      if constexpr (GATED) {
        const float a = pair_weights ? pair_weights[pair] : 1.f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t col = n0 + warp_n * 16 + nt * 8 + (lane % 4) * 2 + e;
            const float gate = a * acc[mt][nt][2 * h + e], up = a * acc[mt][nt + 2][2 * h + e];
            if (col < n) out_row[col] = from_float<T>(silu(gate) * up);
          }
      } else {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t col = n0 + warp_n * 32 + nt * 8 + (lane % 4) * 2 + e;
            if (col < n) out_row[col] = from_float<T>(acc[mt][nt][2 * h + e]);
          }
      }
    }
  }
#endif
}

// ---- the weighted sum over the k slots ------------------------------------------------------------

constexpr int kCombineThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kCombineThreads)
moe_combine_kernel(T* __restrict__ out,                   // [num_tokens, hidden]
                   const T* __restrict__ expert_out,      // [num_tokens * k, hidden]
                   const float* __restrict__ topk_weights,  // [num_tokens, k]
                   const int32_t* __restrict__ topk_ids,    // [num_tokens, k]
                   int num_experts, int64_t hidden, int top_k, bool weight_on_input) {
  const int64_t t = blockIdx.x;
  const int64_t h = (static_cast<int64_t>(blockIdx.y) * kCombineThreads + threadIdx.x) * VEC;
  if (h >= hidden) return;
  float acc[VEC] = {};
  for (int j = 0; j < top_k; ++j) {
    const int64_t p = t * top_k + j;
    const int id = topk_ids[p];
    if (id < 0 || id >= num_experts) continue;  // left out by the alignment too
    const float w = weight_on_input ? 1.f : topk_weights[p];
    const auto y = Vec<T, VEC>::load(expert_out + p * hidden + h);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = fmaf(w, y.f(e), acc[e]);
  }
  Vec<T, VEC> o;
#pragma unroll
  for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(acc[e]);
  o.store(out + t * hidden + h);
}

// ---- launch helpers -------------------------------------------------------------------------------

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether the current device runs mma.sync on bf16 / fp16 (sm_80+), asked once per device.
cudaError_t current_device_has_mma(bool* has_mma) {
  static int majors[64] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  *has_mma = false;
  if (device < 0 || device >= 64) return cudaSuccess;
  if (majors[device] == 0) {
    err = cudaDeviceGetAttribute(&majors[device], cudaDevAttrComputeCapabilityMajor, device);
    if (err != cudaSuccess) return err;
  }
  *has_mma = majors[device] >= 8;
  return cudaSuccess;
}

// The workspace's pieces, each 16-byte aligned: the alignment's outputs (sized for either path's
// tiles), the activations [P, I] and the expert outputs [P, H].
struct Workspace {
  int32_t* sorted_ids;
  int32_t* expert_offsets;
  int32_t* tile_experts;
  void* act;
  void* expert_out;
  size_t bytes;
};

inline size_t round16(size_t bytes) { return (bytes + 15) / 16 * 16; }

Workspace carve(void* base, int64_t num_pairs, int64_t hidden, int64_t inter, int64_t num_experts,
                size_t elem_size) {
  const int64_t padded_pairs = std::max(moe_max_padded_pairs(num_pairs, num_experts, kMmaBlockM),
                                        moe_max_padded_pairs(num_pairs, num_experts, kGemvTokens));
  const int64_t tiles = std::max(moe_max_tiles(num_pairs, num_experts, kMmaBlockM),
                                 moe_max_tiles(num_pairs, num_experts, kGemvTokens));
  auto* p = static_cast<char*>(base);
  Workspace ws{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    char* piece = p ? p + at : nullptr;
    at += round16(bytes);
    return piece;
  };
  ws.sorted_ids = reinterpret_cast<int32_t*>(take(padded_pairs * sizeof(int32_t)));
  ws.expert_offsets = reinterpret_cast<int32_t*>(take((num_experts + 1) * sizeof(int32_t)));
  ws.tile_experts = reinterpret_cast<int32_t*>(take(tiles * sizeof(int32_t)));
  ws.act = take(num_pairs * inter * elem_size);
  ws.expert_out = take(num_pairs * hidden * elem_size);
  ws.bytes = at;
  return ws;
}

template <typename T, bool GATED>
void launch_gemv(T* out, const T* input, const T* weight, const float* pair_weights,
                 const Workspace& ws, int64_t num_pairs, int64_t num_experts, int input_div,
                 int64_t n, int64_t k, cudaStream_t stream) {
  // A tile holds at least one pair, so there are at most num_pairs; CTAs past the last exit.
  const int64_t tiles = std::min(moe_max_tiles(num_pairs, num_experts, kGemvTokens), num_pairs);
  const dim3 grid(static_cast<unsigned>(tiles),
                  static_cast<unsigned>((n + kGemvWarps * kGemvRows - 1) / (kGemvWarps * kGemvRows)));
  constexpr int N = kVec16<T>;
  auto run = [&](auto kernel) {
    kernel<<<grid, kGemvWarps * 32, 0, stream>>>(out, input, weight, pair_weights, ws.sorted_ids,
                                                 ws.tile_experts, ws.expert_offsets,
                                                 static_cast<int>(num_experts), static_cast<int>(num_pairs),
                                                 input_div, n, k);
  };
  if (k % N == 0 && aligned16(input) && aligned16(weight)) {
    run(moe_gemv_kernel<T, N, GATED>);
  } else {
    run(moe_gemv_kernel<T, 1, GATED>);
  }
}

template <typename T, bool GATED>
void launch_mma(T* out, const T* input, const T* weight, const float* pair_weights,
                const Workspace& ws, int64_t num_pairs, int64_t num_experts, int input_div,
                int64_t n, int64_t k, cudaStream_t stream) {
  constexpr int kOutCols = GATED ? kMmaBlockN / 2 : kMmaBlockN;
  // A tile holds at least one pair, so there are at most num_pairs; CTAs past the last exit.
  const int64_t tiles = std::min(moe_max_tiles(num_pairs, num_experts, kMmaBlockM), num_pairs);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((n + kOutCols - 1) / kOutCols));
  moe_mma_kernel<T, GATED><<<grid, kMmaThreads, 0, stream>>>(
      out, input, weight, pair_weights, ws.sorted_ids, ws.tile_experts, ws.expert_offsets,
      static_cast<int>(num_experts), static_cast<int>(num_pairs), input_div, n, k);
}

}  // namespace

// ---- launchers ------------------------------------------------------------------------------------

cudaError_t moe_route_launch(float* topk_weights, int32_t* topk_ids, const float* router_logits,
                             const float* correction_bias, int64_t num_tokens,
                             int64_t logits_stride, const MoeRouting& routing,
                             cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  // Up to 56 KiB (E = G = kMoeMaxExperts), past the default 48 KiB of dynamic shared memory.
  static const cudaError_t attr = cudaFuncSetAttribute(
      moe_route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
      kRouteWarps * route_smem_per_warp(kMoeMaxExperts, kMoeMaxExperts));
  if (attr != cudaSuccess) return attr;
  const int per_warp = route_smem_per_warp(routing.num_experts, routing.num_groups);
  const int grid = static_cast<int>((num_tokens + kRouteWarps - 1) / kRouteWarps);
  moe_route_kernel<<<grid, kRouteWarps * 32, kRouteWarps * per_warp, stream>>>(
      topk_weights, topk_ids, router_logits, correction_bias, num_tokens, logits_stride, routing,
      per_warp);
  return cudaGetLastError();
}

cudaError_t moe_align_launch(int32_t* sorted_ids, int32_t* expert_offsets, int32_t* tile_experts,
                             const int32_t* topk_ids, int64_t num_pairs, int64_t num_experts,
                             int64_t block_size, cudaStream_t stream) {
  static const cudaError_t attr = cudaFuncSetAttribute(
      moe_align_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, align_smem_bytes(kMoeMaxExperts));
  if (attr != cudaSuccess) return attr;
  moe_align_kernel<<<1, kAlignThreads, align_smem_bytes(num_experts), stream>>>(
      sorted_ids, expert_offsets, tile_experts, topk_ids, static_cast<int>(num_pairs),
      static_cast<int>(num_experts), static_cast<int>(block_size),
      static_cast<int>(moe_max_padded_pairs(num_pairs, num_experts, block_size)),
      static_cast<int>(moe_max_tiles(num_pairs, num_experts, block_size)));
  return cudaGetLastError();
}

size_t fused_moe_workspace_bytes(int64_t num_tokens, int64_t hidden, int64_t inter,
                                 int64_t num_experts, int64_t top_k, size_t elem_size) {
  return carve(nullptr, num_tokens * top_k, hidden, inter, num_experts, elem_size).bytes;
}

template <typename T>
cudaError_t fused_moe_launch(T* out, const T* x, const T* w13, const T* w2,
                             const float* topk_weights, const int32_t* topk_ids, void* workspace,
                             int64_t num_tokens, int64_t hidden, int64_t inter,
                             int64_t num_experts, int64_t top_k, bool weight_on_input,
                             cudaStream_t stream) {
  const int64_t num_pairs = num_tokens * top_k;
  if (num_pairs == 0 || hidden == 0) return cudaSuccess;
  const Workspace ws = carve(workspace, num_pairs, hidden, inter, num_experts, sizeof(T));
  T* act = static_cast<T*>(ws.act);
  T* expert_out = static_cast<T*>(ws.expert_out);
  const float* pair_weights = weight_on_input ? topk_weights : nullptr;
  const int k = static_cast<int>(top_k);
  bool tensor_cores = false;
  if constexpr (!std::is_same_v<T, float>) {
    tensor_cores = num_pairs > kMoeGemvMaxPairs && hidden % 8 == 0 && inter % 8 == 0 &&
                   aligned16(x) && aligned16(w13) && aligned16(w2);
  }
  cudaError_t err = cudaSuccess;
  if (tensor_cores) {
    err = current_device_has_mma(&tensor_cores);
    if (err != cudaSuccess) return err;
  }
  err = moe_align_launch(ws.sorted_ids, ws.expert_offsets, ws.tile_experts, topk_ids,
                                     num_pairs, num_experts,
                                     tensor_cores ? kMmaBlockM : kGemvTokens, stream);
  if (err != cudaSuccess) return err;
  if (inter > 0) {
    if constexpr (!std::is_same_v<T, float>) {
      if (tensor_cores) {
        launch_mma<T, true>(act, x, w13, pair_weights, ws, num_pairs, num_experts, k, inter,
                            hidden, stream);
        launch_mma<T, false>(expert_out, act, w2, nullptr, ws, num_pairs, num_experts, 1, hidden,
                             inter, stream);
      }
    }
    if (!tensor_cores) {
      launch_gemv<T, true>(act, x, w13, pair_weights, ws, num_pairs, num_experts, k, inter,
                           hidden, stream);
      launch_gemv<T, false>(expert_out, act, w2, nullptr, ws, num_pairs, num_experts, 1, hidden,
                            inter, stream);
    }
  } else {
    err = cudaMemsetAsync(expert_out, 0, num_pairs * hidden * sizeof(T), stream);
    if (err != cudaSuccess) return err;
  }
  constexpr int N = kVec16<T>;
  auto combine = [&](auto kernel, int vec) {
    const dim3 grid(static_cast<unsigned>(num_tokens),
                    static_cast<unsigned>((hidden / vec + kCombineThreads - 1) / kCombineThreads));
    kernel<<<grid, kCombineThreads, 0, stream>>>(out, expert_out, topk_weights, topk_ids,
                                                 static_cast<int>(num_experts), hidden, k,
                                                 weight_on_input);
  };
  if (hidden % N == 0 && aligned16(out)) {
    combine(moe_combine_kernel<T, N>, N);
  } else {
    combine(moe_combine_kernel<T, 1>, 1);
  }
  return cudaGetLastError();
}

#define FASTGEN_INSTANTIATE(T)                                                                \
  template cudaError_t fused_moe_launch<T>(T*, const T*, const T*, const T*, const float*,    \
                                           const int32_t*, void*, int64_t, int64_t, int64_t,  \
                                           int64_t, int64_t, bool, cudaStream_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(__half)
FASTGEN_INSTANTIATE(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE

// ---- tensor adapters ------------------------------------------------------------------------------

namespace {

void check_num_experts(const char* op, int64_t num_experts) {
  TORCH_CHECK(num_experts <= kMoeMaxExperts, op, ": the CUDA kernels take at most ",
              kMoeMaxExperts, " experts, got ", num_experts);
}

}  // namespace

void moe_route(at::Tensor& topk_weights, at::Tensor& topk_ids, const at::Tensor& router_logits,
               std::string_view scoring, bool renormalize, std::optional<int64_t> num_groups,
               std::optional<int64_t> topk_groups, std::string_view group_scoring,
               const std::optional<at::Tensor>& correction_bias, double scale) {
  const MoeRouting routing =
      check_moe_route_args(topk_weights, topk_ids, router_logits, scoring, renormalize,
                           num_groups, topk_groups, group_scoring, correction_bias, scale);
  check_num_experts("moe_route", routing.num_experts);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  C10_CUDA_CHECK(moe_route_launch(topk_weights.data_ptr<float>(), topk_ids.data_ptr<int32_t>(),
                                  router_logits.data_ptr<float>(),
                                  correction_bias ? correction_bias->data_ptr<float>() : nullptr,
                                  router_logits.size(0), router_logits.stride(0), routing,
                                  c10::cuda::getCurrentCUDAStream()));
}

void moe_align(at::Tensor& sorted_ids, at::Tensor& expert_offsets, at::Tensor& tile_experts,
               const at::Tensor& topk_ids, int64_t block_size) {
  check_moe_align_args(sorted_ids, expert_offsets, tile_experts, topk_ids, block_size);
  const int64_t num_experts = expert_offsets.size(0) - 1;
  check_num_experts("moe_align", num_experts);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  C10_CUDA_CHECK(moe_align_launch(sorted_ids.data_ptr<int32_t>(), expert_offsets.data_ptr<int32_t>(),
                                  tile_experts.data_ptr<int32_t>(), topk_ids.data_ptr<int32_t>(),
                                  topk_ids.numel(), num_experts, block_size,
                                  c10::cuda::getCurrentCUDAStream()));
}

void fused_moe(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
               const at::Tensor& topk_weights, const at::Tensor& topk_ids, bool weight_on_input) {
  constexpr const char* op = "fused_moe";
  check_fused_moe_args(out, x, w13, w2, topk_weights, topk_ids);
  const int64_t num_tokens = x.size(0), hidden = x.size(1), inter = w2.size(2);
  const int64_t num_experts = w13.size(0), top_k = topk_ids.size(1);
  check_num_experts(op, num_experts);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor workspace = at::empty(
      {static_cast<int64_t>(fused_moe_workspace_bytes(num_tokens, hidden, inter, num_experts, top_k,
                                                      x.element_size()))},
      x.options().dtype(at::kByte));
  FASTGEN_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    using T = cuda_type_t<scalar_t>;
    C10_CUDA_CHECK(fused_moe_launch<T>(
        reinterpret_cast<T*>(out.data_ptr()), reinterpret_cast<const T*>(x.data_ptr()),
        reinterpret_cast<const T*>(w13.data_ptr()), reinterpret_cast<const T*>(w2.data_ptr()),
        topk_weights.data_ptr<float>(), topk_ids.data_ptr<int32_t>(), workspace.data_ptr(),
        num_tokens, hidden, inter, num_experts, top_k, weight_on_input,
        c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace fastgen::cuda
