// Paged decode attention on the GPU (every sequence has at most one query): split-KV
// ("flash-decoding") with grouped-query heads served from one read of their KV head.
//
// Decode attention is memory-bound: each step reads every visible key and value once, and the
// work is a dot product and an axpy per key and query head. So the kernel is built around the
// loads:
//   * One CTA per (KV head, sequence, split) reads each of its keys and values exactly once and
//     applies them to all GROUP query heads that share the KV head (their queries sit in
//     registers), instead of once per query head.
//   * A key row is read by kLanesPerKey lanes with 16-byte loads (D = 128 bf16: 16 lanes x 8
//     values), so a warp reads kKeysPerWarp whole rows per instruction; each thread issues the
//     loads of UNROLL keys (K and V) before using any, to keep enough bytes in flight.
//   * A long sequence's visible keys are cut into up to num_splits contiguous splits of at least
//     kMinKeysPerSplit keys, so a batch of one 32k-token sequence still fills the GPU. Each split
//     keeps a float32 online softmax (running max m, sum l, unnormalised accumulator) per lane
//     group, merged within the warp by shuffles and across warps in shared memory; a sequence
//     that needs one split writes its output directly, others write (acc, m, l) partials that
//     decode_combine_kernel merges.
// num_splits is fixed by the host from an upper bound on the context, and each sequence uses
// only as many splits as its length needs: the grid never depends on the metadata's values, so
// the kernels can be captured in a CUDA graph and replayed as sequences grow.
#include <algorithm>
#include <cstdint>

#include "core/attention_mask.h"
#include "cuda/attention.h"
#include "cuda/common.cuh"

namespace fastgen::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMinKeysPerSplit = 256;
constexpr int kMaxSplits = 64;
// The running max starts finite: exp2(m - m_new) then stays a number (1 or 0) even before the
// first key, and a masked key's score, -inf, gives p = 0.
constexpr float kNoMax = -1e30f;

template <typename T, int HEAD_DIM>
struct Layout {
  static constexpr int kVec = kVec16<T>;                                          // values per load
  static constexpr int kLanesPerKey = HEAD_DIM / kVec < 32 ? HEAD_DIM / kVec : 32;
  static constexpr int kElems = HEAD_DIM / kLanesPerKey;                          // values per lane
  static constexpr int kLoads = kElems / kVec;                                    // loads per lane
  static constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  static constexpr int kWorkers = kWarps * kKeysPerWarp;                          // keys per CTA step
  static_assert(HEAD_DIM % (kVec * kLanesPerKey) == 0, "head size must be whole loads per lane");
  // Element e of a lane (sub = lane % kLanesPerKey) is dimension (e / kVec * kLanesPerKey + sub)
  // * kVec + e % kVec of the row: the lanes of a key read one contiguous run per load.
  static __device__ __forceinline__ int dim(int sub, int load) {
    return (load * kLanesPerKey + sub) * kVec;
  }
};

// The keys sequence `seq`'s query sees, [first, last], and how many splits they use.
struct Visible {
  int64_t first, last;
  int splits;
};

__device__ __forceinline__ Visible visible_keys(int64_t k_len, int64_t window, int64_t chunk,
                                                int num_splits) {
  const int64_t pos = k_len - 1;  // the query is the last cached token
  const int64_t first = first_visible_key(pos, window, chunk);
  const int64_t n = max(int64_t{0}, pos - first + 1);
  const int64_t wanted = max(int64_t{1}, (n + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  return {first, pos, static_cast<int>(min(wanted, static_cast<int64_t>(num_splits)))};
}

template <typename T, int HEAD_DIM, int GROUP, int UNROLL>
__global__ void __launch_bounds__(kThreads)
decode_attention_kernel(T* __restrict__ out,                       // [num_tokens, num_heads, HEAD_DIM]
                        const T* __restrict__ query,               // [num_tokens, num_heads, HEAD_DIM]
                        const T* __restrict__ key_cache,           // [N, block_size, num_kv_heads, HEAD_DIM]
                        const T* __restrict__ value_cache,         // [N, block_size, num_kv_heads, HEAD_DIM]
                        const int32_t* __restrict__ cu_seqlens_q,  // [num_seqs + 1]
                        const int32_t* __restrict__ seq_lens_k,    // [num_seqs]
                        const int32_t* __restrict__ block_tables,  // [num_seqs, max_blocks_per_seq]
                        float* __restrict__ partial_acc,           // [num_seqs, num_heads, num_splits, HEAD_DIM]
                        float* __restrict__ partial_ml,            // [num_seqs, num_heads, num_splits, 2]
                        int num_heads, int num_kv_heads, int group, int block_size,
                        int max_blocks_per_seq, int64_t query_stride, float scale_log2,
                        int64_t window, int64_t chunk, int num_splits) {
  using L = Layout<T, HEAD_DIM>;
  using V = Vec<T, L::kVec>;
  const int tiles = (group + GROUP - 1) / GROUP;
  const int kv_head = blockIdx.x / tiles;
  const int head0 = kv_head * group + blockIdx.x % tiles * GROUP;  // this CTA's first query head
  const int heads = min(GROUP, group - blockIdx.x % tiles * GROUP);
  const int seq = blockIdx.y, split = blockIdx.z;
  const int token = cu_seqlens_q[seq];
  if (cu_seqlens_q[seq + 1] == token) return;  // no query this step
  const Visible vis = visible_keys(seq_lens_k[seq], window, chunk, num_splits);
  if (split >= vis.splits) return;
  const int64_t per_split = (vis.last - vis.first + vis.splits) / vis.splits;  // ceil(n / splits)
  const int64_t begin = vis.first + split * per_split;
  const int64_t end = min(begin + per_split, vis.last + 1);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane % L::kLanesPerKey;
  const int worker = warp * L::kKeysPerWarp + lane / L::kLanesPerKey;

  // This lane's slice of each query head, pre-scaled so scores are in the log2 domain.
  float q[GROUP][L::kElems];
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    const T* q_row = query + token * query_stride + static_cast<int64_t>(head0 + h) * HEAD_DIM;
#pragma unroll
    for (int l = 0; l < L::kLoads; ++l) {
      const V x = h < heads ? V::load(q_row + L::dim(sub, l)) : V{};
#pragma unroll
      for (int i = 0; i < L::kVec; ++i) q[h][l * L::kVec + i] = h < heads ? x.f(i) * scale_log2 : 0.f;
    }
  }

  float m[GROUP], l_sum[GROUP], acc[GROUP][L::kElems];
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    m[h] = kNoMax;
    l_sum[h] = 0.f;
#pragma unroll
    for (int e = 0; e < L::kElems; ++e) acc[h][e] = 0.f;
  }

  const int32_t* block_table = block_tables + static_cast<int64_t>(seq) * max_blocks_per_seq;
  const int64_t kv_stride = static_cast<int64_t>(num_kv_heads) * HEAD_DIM;  // between slots
  // The loop bound is the same for every thread (shuffles need the whole warp); a lane whose key
  // is past `end` loads nothing and scores -inf.
  for (int64_t step = begin; step < end; step += L::kWorkers * UNROLL) {
    V k[UNROLL][L::kLoads], v[UNROLL][L::kLoads];
    bool valid[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t j = step + u * L::kWorkers + worker;
      valid[u] = j < end;
      if (valid[u]) {
        const int key = static_cast<int>(j);  // 32-bit division: contexts stay below 2^31
        const int64_t slot = static_cast<int64_t>(block_table[key / block_size]) * block_size + key % block_size;
        const int64_t offset = slot * kv_stride + static_cast<int64_t>(kv_head) * HEAD_DIM;
#pragma unroll
        for (int l = 0; l < L::kLoads; ++l) {
          k[u][l] = V::load(key_cache + offset + L::dim(sub, l));
          v[u][l] = V::load(value_cache + offset + L::dim(sub, l));
        }
      } else {
#pragma unroll
        for (int l = 0; l < L::kLoads; ++l) k[u][l] = v[u][l] = V{};  // zeros: p * v stays 0
      }
    }
    float s[UNROLL][GROUP];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int h = 0; h < GROUP; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int l = 0; l < L::kLoads; ++l) {
#pragma unroll
          for (int i = 0; i < L::kVec; ++i) dot += q[h][l * L::kVec + i] * k[u][l].f(i);
        }
#pragma unroll
        for (int offset = L::kLanesPerKey / 2; offset > 0; offset >>= 1) {
          dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        }
        s[u][h] = valid[u] ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
      float m_new = m[h];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) m_new = fmaxf(m_new, s[u][h]);
      const float alpha = exp2f(m[h] - m_new);
      l_sum[h] *= alpha;
#pragma unroll
      for (int e = 0; e < L::kElems; ++e) acc[h][e] *= alpha;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const float p = exp2f(s[u][h] - m_new);
        l_sum[h] += p;
#pragma unroll
        for (int l = 0; l < L::kLoads; ++l) {
#pragma unroll
          for (int i = 0; i < L::kVec; ++i) acc[h][l * L::kVec + i] += p * v[u][l].f(i);
        }
      }
      m[h] = m_new;
    }
  }

  // Merge the warp's key groups (lanes sub, sub + kLanesPerKey, ... hold the same dims).
#pragma unroll
  for (int offset = L::kLanesPerKey; offset < 32; offset *= 2) {
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[h], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l_sum[h], offset);
      const float m_new = fmaxf(m[h], m_other);
      const float a = exp2f(m[h] - m_new), b = exp2f(m_other - m_new);
      l_sum[h] = l_sum[h] * a + l_other * b;
#pragma unroll
      for (int e = 0; e < L::kElems; ++e) {
        acc[h][e] = acc[h][e] * a + __shfl_xor_sync(0xffffffffu, acc[h][e], offset) * b;
      }
      m[h] = m_new;
    }
  }

  // Merge the warps through shared memory.
  __shared__ float s_m[kWarps][GROUP], s_l[kWarps][GROUP];
  __shared__ float s_acc[kWarps][GROUP][HEAD_DIM];
  if (lane < L::kLanesPerKey) {
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
      if (sub == 0) {
        s_m[warp][h] = m[h];
        s_l[warp][h] = l_sum[h];
      }
#pragma unroll
      for (int l = 0; l < L::kLoads; ++l) {
#pragma unroll
        for (int i = 0; i < L::kVec; ++i) s_acc[warp][h][L::dim(sub, l) + i] = acc[h][l * L::kVec + i];
      }
    }
  }
  __syncthreads();
  for (int item = threadIdx.x; item < heads * HEAD_DIM; item += kThreads) {
    const int h = item / HEAD_DIM, d = item % HEAD_DIM;
    float m_all = kNoMax;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w][h]);
    float l_all = 0.f, a_all = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = exp2f(s_m[w][h] - m_all);
      l_all += s_l[w][h] * weight;
      a_all += s_acc[w][h][d] * weight;
    }
    const int head = head0 + h;
    if (vis.splits == 1) {
      out[(static_cast<int64_t>(token) * num_heads + head) * HEAD_DIM + d] =
          from_float<T>(l_all > 0.f ? a_all / l_all : 0.f);  // no visible key (padding): zeros
    } else {
      const int64_t part = (static_cast<int64_t>(seq) * num_heads + head) * num_splits + split;
      partial_acc[part * HEAD_DIM + d] = a_all;
      if (d == 0) {
        partial_ml[2 * part] = m_all;
        partial_ml[2 * part + 1] = l_all;
      }
    }
  }
}

// Merges the splits of every sequence that used more than one. One CTA per (sequence, head).
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM)
decode_combine_kernel(T* __restrict__ out,                       // [num_tokens, num_heads, HEAD_DIM]
                      const float* __restrict__ partial_acc,     // [num_seqs, num_heads, num_splits, HEAD_DIM]
                      const float* __restrict__ partial_ml,      // [num_seqs, num_heads, num_splits, 2]
                      const int32_t* __restrict__ cu_seqlens_q,  // [num_seqs + 1]
                      const int32_t* __restrict__ seq_lens_k,    // [num_seqs]
                      int num_heads, int64_t window, int64_t chunk, int num_splits) {
  const int seq = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
  const int token = cu_seqlens_q[seq];
  if (cu_seqlens_q[seq + 1] == token) return;
  const Visible vis = visible_keys(seq_lens_k[seq], window, chunk, num_splits);
  if (vis.splits == 1) return;  // written by the main kernel
  const int64_t part0 = (static_cast<int64_t>(seq) * num_heads + head) * num_splits;
  float m_all = kNoMax;
  for (int s = 0; s < vis.splits; ++s) m_all = fmaxf(m_all, partial_ml[2 * (part0 + s)]);
  float l_all = 0.f, a_all = 0.f;
  for (int s = 0; s < vis.splits; ++s) {
    const float weight = exp2f(partial_ml[2 * (part0 + s)] - m_all);
    l_all += partial_ml[2 * (part0 + s) + 1] * weight;
    a_all += partial_acc[(part0 + s) * HEAD_DIM + d] * weight;
  }
  out[(static_cast<int64_t>(token) * num_heads + head) * HEAD_DIM + d] =
      from_float<T>(l_all > 0.f ? a_all / l_all : 0.f);
}

// Query heads per CTA: the group size rounded up to 1, 2, 4 or 8 (larger groups take several
// CTAs per KV head, each re-reading it).
inline int group_tile(int64_t group) { return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8; }

// Calls f(kernel) with the kernel instance for a group tile (heads per CTA) of 1, 2, 4 or 8; fewer
// keys are in flight per thread as the heads' registers grow.
template <typename T, int HEAD_DIM, typename F>
void with_kernel(int tile, F&& f) {
  switch (tile) {
    case 1: f(decode_attention_kernel<T, HEAD_DIM, 1, 4>); break;
    case 2: f(decode_attention_kernel<T, HEAD_DIM, 2, 4>); break;
    case 4: f(decode_attention_kernel<T, HEAD_DIM, 4, 4>); break;
    default: f(decode_attention_kernel<T, HEAD_DIM, 8, 2>); break;
  }
}

}  // namespace

template <typename T, int HEAD_DIM>
int decode_attention_num_splits(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                int64_t max_seqlen_k, int num_sms) {
  const int64_t group = num_heads / num_kv_heads;
  const int tile = group_tile(group);
  const int64_t ctas = std::max<int64_t>(num_seqs * num_kv_heads * ((group + tile - 1) / tile), 1);
  // How many CTAs of this kernel an SM holds at once (registers bound it), asked once per tile
  // (first from an eager step, before any CUDA graph captures).
  static int resident[9] = {};
  if (resident[tile] == 0) {
    with_kernel<T, HEAD_DIM>(tile, [&](auto kernel) {
      int count = 0;
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, kernel, kThreads, 0);
      resident[tile] = count > 0 ? count : 1;
    });
  }
  const int64_t capacity = static_cast<int64_t>(resident[tile]) * num_sms;
  // Splits that keep the last wave of CTAs full (flash-attention's heuristic, for a kernel with
  // several CTAs per SM): below one wave, more splits always help; past it, the fewest splits
  // within 10% of the best wave efficiency.
  const int64_t useful = std::clamp<int64_t>(
      (max_seqlen_k + kMinKeysPerSplit - 1) / kMinKeysPerSplit, 1, kMaxSplits);
  auto efficiency = [&](int64_t splits) {
    const int64_t work = ctas * splits, waves = (work + capacity - 1) / capacity;
    return static_cast<double>(work) / static_cast<double>(waves * capacity);
  };
  int64_t best = 1;
  for (int64_t splits = 2; splits <= useful; ++splits) {
    if (efficiency(splits) > efficiency(best) + 1e-9) best = splits;
  }
  for (int64_t splits = 1; splits < best; ++splits) {
    if (ctas * splits > capacity && efficiency(splits) >= 0.9 * efficiency(best)) {
      return static_cast<int>(splits);
    }
  }
  return static_cast<int>(best);
}

template <typename T, int HEAD_DIM>
cudaError_t decode_attention_launch(T* out, const T* query, const T* key_cache,
                                    const T* value_cache, const int32_t* cu_seqlens_q,
                                    const int32_t* seq_lens_k, const int32_t* block_tables,
                                    float* workspace, int64_t num_seqs, int64_t num_heads,
                                    int64_t num_kv_heads, int64_t block_size,
                                    int64_t max_blocks_per_seq, int64_t query_stride,
                                    float scale, std::optional<int64_t> sliding_window,
                                    std::optional<int64_t> chunk_size, int num_splits,
                                    cudaStream_t stream) {
  if (num_seqs == 0) return cudaSuccess;
  const int64_t window = sliding_window.value_or(kUnbounded), chunk = chunk_size.value_or(kUnbounded);
  const int64_t group = num_heads / num_kv_heads;
  const int tile = group_tile(group);
  const dim3 grid(static_cast<unsigned>(num_kv_heads * ((group + tile - 1) / tile)),
                  static_cast<unsigned>(num_seqs), static_cast<unsigned>(num_splits));
  float* partial_acc = workspace;
  float* partial_ml = workspace + num_seqs * num_heads * num_splits * HEAD_DIM;
  with_kernel<T, HEAD_DIM>(tile, [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(
        out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k, block_tables, partial_acc,
        partial_ml, static_cast<int>(num_heads), static_cast<int>(num_kv_heads),
        static_cast<int>(group), static_cast<int>(block_size),
        static_cast<int>(max_blocks_per_seq), query_stride, scale * kLog2e, window, chunk,
        num_splits);
  });
  if (num_splits > 1) {
    const dim3 combine_grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(num_heads));
    decode_combine_kernel<T, HEAD_DIM><<<combine_grid, HEAD_DIM, 0, stream>>>(
        out, partial_acc, partial_ml, cu_seqlens_q, seq_lens_k, static_cast<int>(num_heads),
        window, chunk, num_splits);
  }
  return cudaGetLastError();
}

int64_t decode_attention_workspace_floats(int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                          int num_splits) {
  return num_splits > 1 ? num_seqs * num_heads * num_splits * (head_dim + 2) : 0;
}

#define FASTGEN_INSTANTIATE(T, D)                                                              \
  template int decode_attention_num_splits<T, D>(int64_t, int64_t, int64_t, int64_t, int);     \
  template cudaError_t decode_attention_launch<T, D>(                                         \
      T*, const T*, const T*, const T*, const int32_t*, const int32_t*, const int32_t*, float*, \
      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, std::optional<int64_t>,     \
      std::optional<int64_t>, int, cudaStream_t);
#define FASTGEN_INSTANTIATE_HEAD_DIMS(T) \
  FASTGEN_INSTANTIATE(T, 64) FASTGEN_INSTANTIATE(T, 128) FASTGEN_INSTANTIATE(T, 256)
FASTGEN_INSTANTIATE_HEAD_DIMS(float)
FASTGEN_INSTANTIATE_HEAD_DIMS(__half)
FASTGEN_INSTANTIATE_HEAD_DIMS(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE_HEAD_DIMS
#undef FASTGEN_INSTANTIATE

}  // namespace fastgen::cuda
