// DeepSeek MLA's absorbed decode attention on the GPU: every query head of a sequence attends
// over the same latent-cache rows [c_kv (512) | k_pe (64)], the rows being the keys and their
// first 512 elements the values (see the mla_attention schema and python/fastgen/layers/mla.py).
//
// Where the standard decode kernel gives each CTA one KV head and a few query heads, here one
// latent row serves all H query heads (16 for V2-Lite, 128 for V3), so a CTA takes kHeadTile
// heads and stages each tile of kKeyTile rows in shared memory once for all of them:
//   1. the tile's rows are copied to shared memory (16-byte loads, coalesced along each row);
//   2. scores: each thread computes 2 heads x 1 key over the 576 dims, from shared memory;
//   3. softmax: one warp per 2 heads, a lane per key, float32 online softmax in the log2 domain;
//   4. P.V: each thread owns 2 of the 512 value dims for all kHeadTile heads (32 accumulators in
//      registers), reading the probabilities as float4 broadcasts.
// A long context is cut into up to num_splits contiguous splits (flash-decoding), merged by
// mla_decode_combine_kernel, as in decode_attention.cu; the grid depends only on the sizes, so
// it can be captured in a CUDA graph. SIMT, not tensor cores: the first version, kept simple until
// a GPU has measured it (issue 18).
#include <algorithm>
#include <cstdint>

#include "core/attention_mask.h"
#include "cuda/attention.h"
#include "cuda/common.cuh"

namespace fastgen::cuda {

namespace {

constexpr int kRow = kLatentHeadDim;  // 576: the key width
constexpr int kLatent = 512;          // the value width
constexpr int kThreads = 256;
constexpr int kHeadTile = 16;
constexpr int kKeyTile = 32;
constexpr int kMinKeysPerSplit = 256;
constexpr int kMaxSplits = 64;
constexpr int kPad = 8;  // elements after each shared row: 16-byte loads of 8 rows hit 32 banks
constexpr float kNoMax = -1e30f;
static_assert(kLatent == 2 * kThreads, "each thread owns two value dims");
static_assert(kHeadTile * kKeyTile == 2 * kThreads, "each thread scores two (head, key) pairs");

template <typename T>
struct Smem {
  static constexpr int kStride = kRow + kPad;
  static constexpr size_t kBytes = sizeof(T) * (kHeadTile + kKeyTile) * kStride +
                                   sizeof(float) * (kKeyTile * kHeadTile + kHeadTile * kKeyTile + 3 * kHeadTile);
};

// Where split `split` of a sequence's n keys begins (splits of ceil(n / splits) keys).
__device__ __forceinline__ int64_t split_begin(int64_t n, int splits, int split) {
  return split * ((n + splits - 1) / splits);
}

// How many splits sequence `seq`'s keys [0, k_len) use.
__device__ __forceinline__ int used_splits(int64_t k_len, int num_splits) {
  const int64_t wanted = max(int64_t{1}, (k_len + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  return static_cast<int>(min(wanted, static_cast<int64_t>(num_splits)));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
mla_decode_kernel(T* __restrict__ out,                       // [num_tokens, num_heads, kLatent]
                  const T* __restrict__ query,               // [num_tokens, num_heads, kRow]
                  const T* __restrict__ cache,               // [N, block_size, kRow]
                  const int32_t* __restrict__ cu_seqlens_q,  // [num_seqs + 1]
                  const int32_t* __restrict__ seq_lens_k,    // [num_seqs]
                  const int32_t* __restrict__ block_tables,  // [num_seqs, max_blocks_per_seq]
                  float* __restrict__ partial_acc,           // [num_seqs, num_heads, num_splits, kLatent]
                  float* __restrict__ partial_ml,            // [num_seqs, num_heads, num_splits, 2]
                  int num_heads, int block_size, int max_blocks_per_seq, int64_t query_stride,
                  float scale_log2, int num_splits) {
  using V = Vec<T, kVec16<T>>;
  constexpr int kVec = kVec16<T>;
  constexpr int kStride = Smem<T>::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);           // [kHeadTile][kStride]
  T* k_s = q_s + kHeadTile * kStride;                 // [kKeyTile][kStride]
  float* s_s = reinterpret_cast<float*>(k_s + kKeyTile * kStride);  // [kHeadTile][kKeyTile] scores
  float* p_s = s_s + kHeadTile * kKeyTile;            // [kKeyTile][kHeadTile] probabilities
  float* alpha_s = p_s + kKeyTile * kHeadTile;        // [kHeadTile]
  float* m_s = alpha_s + kHeadTile;                   // [kHeadTile] running max (log2 domain)
  float* l_s = m_s + kHeadTile;                       // [kHeadTile] running sum

  const int head0 = blockIdx.x * kHeadTile;
  const int heads = min(kHeadTile, num_heads - head0);
  const int seq = blockIdx.y, split = blockIdx.z;
  const int token = cu_seqlens_q[seq];
  if (cu_seqlens_q[seq + 1] == token) return;  // no query this step
  const int64_t k_len = seq_lens_k[seq];
  const int splits = used_splits(k_len, num_splits);
  if (split >= splits) return;
  const int64_t begin = split_begin(k_len, splits, split);
  const int64_t end = min(split_begin(k_len, splits, split + 1), k_len);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // The tile's queries, zeros past the last head.
  for (int i = tid; i < kHeadTile * (kRow / kVec); i += kThreads) {
    const int h = i / (kRow / kVec), c = i % (kRow / kVec) * kVec;
    const V x = h < heads ? V::load(query + token * query_stride + static_cast<int64_t>(head0 + h) * kRow + c) : V{};
    x.store(q_s + h * kStride + c);
  }
  if (tid < kHeadTile) {
    m_s[tid] = kNoMax;
    l_s[tid] = 0.f;
  }

  float acc[kHeadTile][2];
#pragma unroll
  for (int h = 0; h < kHeadTile; ++h) acc[h][0] = acc[h][1] = 0.f;

  const int32_t* block_table = block_tables + static_cast<int64_t>(seq) * max_blocks_per_seq;
  const int score_key = tid / 8, score_head = tid % 8;  // heads score_head and score_head + 8
  for (int64_t j0 = begin; j0 < end; j0 += kKeyTile) {
    const int num_keys = static_cast<int>(min(static_cast<int64_t>(kKeyTile), end - j0));
    // 1. Rows to shared memory; rows past the split's end are zeros (their p is 0, and 0 * a
    //    stale NaN would not be).
    for (int i = tid; i < kKeyTile * (kRow / kVec); i += kThreads) {
      const int j = i / (kRow / kVec), c = i % (kRow / kVec) * kVec;
      V x{};
      if (j < num_keys) {
        const int key = static_cast<int>(j0) + j;  // contexts stay below 2^31
        const int64_t slot = static_cast<int64_t>(block_table[key / block_size]) * block_size + key % block_size;
        x = V::load(cache + slot * kRow + c);
      }
      x.store(k_s + j * kStride + c);
    }
    __syncthreads();

    // 2. Scores of (score_head, score_key) and (score_head + 8, score_key).
    {
      const T* k = k_s + score_key * kStride;
      const T* qa = q_s + score_head * kStride;
      const T* qb = q_s + (score_head + 8) * kStride;
      float dot_a = 0.f, dot_b = 0.f;
#pragma unroll 4
      for (int c = 0; c < kRow; c += kVec) {
        const V kv = V::load(k + c), a = V::load(qa + c), b = V::load(qb + c);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          dot_a += a.f(i) * kv.f(i);
          dot_b += b.f(i) * kv.f(i);
        }
      }
      const bool valid = score_key < num_keys;
      s_s[score_head * kKeyTile + score_key] = valid ? dot_a * scale_log2 : -INFINITY;
      s_s[(score_head + 8) * kKeyTile + score_key] = valid ? dot_b * scale_log2 : -INFINITY;
    }
    __syncthreads();

    // 3. Online softmax: warp w takes heads 2w and 2w + 1, lane = key.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int h = 2 * warp + i;
      const float s = s_s[h * kKeyTile + lane];
      const float m_old = m_s[h];
      const float m_new = fmaxf(m_old, warp_max(s));  // finite: the tile has a key
      const float p = exp2f(s - m_new);
      const float l_tile = warp_sum(p);
      p_s[lane * kHeadTile + h] = p;
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);
        alpha_s[h] = alpha;
        l_s[h] = l_s[h] * alpha + l_tile;
        m_s[h] = m_new;
      }
    }
    __syncthreads();

    // 4. acc[h][:] = acc[h][:] * alpha[h] + sum_j p[j][h] * v[j][2 tid .. 2 tid + 1].
#pragma unroll
    for (int h = 0; h < kHeadTile; ++h) {
      acc[h][0] *= alpha_s[h];
      acc[h][1] *= alpha_s[h];
    }
    for (int j = 0; j < num_keys; ++j) {
      const float v0 = to_float(k_s[j * kStride + 2 * tid]), v1 = to_float(k_s[j * kStride + 2 * tid + 1]);
      const float4* p4 = reinterpret_cast<const float4*>(p_s + j * kHeadTile);
#pragma unroll
      for (int q4 = 0; q4 < kHeadTile / 4; ++q4) {
        const float4 p = p4[q4];
        acc[4 * q4][0] += p.x * v0;
        acc[4 * q4][1] += p.x * v1;
        acc[4 * q4 + 1][0] += p.y * v0;
        acc[4 * q4 + 1][1] += p.y * v1;
        acc[4 * q4 + 2][0] += p.z * v0;
        acc[4 * q4 + 2][1] += p.z * v1;
        acc[4 * q4 + 3][0] += p.w * v0;
        acc[4 * q4 + 3][1] += p.w * v1;
      }
    }
    __syncthreads();  // k_s, p_s and alpha_s are rewritten by the next tile
  }

  for (int h = 0; h < heads; ++h) {
    const int head = head0 + h;
    if (splits == 1) {
      const float inv = l_s[h] > 0.f ? 1.f / l_s[h] : 0.f;  // no visible key (padding): zeros
      T* o = out + (static_cast<int64_t>(token) * num_heads + head) * kLatent + 2 * tid;
      o[0] = from_float<T>(acc[h][0] * inv);
      o[1] = from_float<T>(acc[h][1] * inv);
    } else {
      const int64_t part = (static_cast<int64_t>(seq) * num_heads + head) * num_splits + split;
      partial_acc[part * kLatent + 2 * tid] = acc[h][0];
      partial_acc[part * kLatent + 2 * tid + 1] = acc[h][1];
      if (tid == 0) {
        partial_ml[2 * part] = m_s[h];
        partial_ml[2 * part + 1] = l_s[h];
      }
    }
  }
}

// Merges the splits of every sequence that used more than one. One CTA per (sequence, head).
template <typename T>
__global__ void __launch_bounds__(kLatent)
mla_decode_combine_kernel(T* __restrict__ out, const float* __restrict__ partial_acc,
                          const float* __restrict__ partial_ml, const int32_t* __restrict__ cu_seqlens_q,
                          const int32_t* __restrict__ seq_lens_k, int num_heads, int num_splits) {
  const int seq = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
  const int token = cu_seqlens_q[seq];
  if (cu_seqlens_q[seq + 1] == token) return;
  const int splits = used_splits(seq_lens_k[seq], num_splits);
  if (splits == 1) return;  // written by the main kernel
  const int64_t part0 = (static_cast<int64_t>(seq) * num_heads + head) * num_splits;
  float m_all = kNoMax;
  for (int s = 0; s < splits; ++s) m_all = fmaxf(m_all, partial_ml[2 * (part0 + s)]);
  float l_all = 0.f, a_all = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float weight = exp2f(partial_ml[2 * (part0 + s)] - m_all);
    l_all += partial_ml[2 * (part0 + s) + 1] * weight;
    a_all += partial_acc[(part0 + s) * kLatent + d] * weight;
  }
  out[(static_cast<int64_t>(token) * num_heads + head) * kLatent + d] =
      from_float<T>(l_all > 0.f ? a_all / l_all : 0.f);
}

}  // namespace

int mla_decode_num_splits(int64_t num_seqs, int64_t num_heads, int64_t max_seqlen_k, int num_sms) {
  const int64_t ctas = std::max<int64_t>(1, num_seqs * ((num_heads + kHeadTile - 1) / kHeadTile));
  const int64_t useful = std::clamp<int64_t>((max_seqlen_k + kMinKeysPerSplit - 1) / kMinKeysPerSplit, 1, kMaxSplits);
  // Enough CTAs for two per SM (one resident CTA of ~60 KB leaves room for another), no more than
  // the keys allow.
  return static_cast<int>(std::clamp<int64_t>((2 * num_sms + ctas - 1) / ctas, 1, useful));
}

int64_t mla_decode_workspace_floats(int64_t num_seqs, int64_t num_heads, int num_splits) {
  return num_splits > 1 ? num_seqs * num_heads * num_splits * (kLatent + 2) : 0;
}

template <typename T>
cudaError_t mla_decode_launch(T* out, const T* query, const T* latent_cache,
                              const int32_t* cu_seqlens_q, const int32_t* seq_lens_k,
                              const int32_t* block_tables, float* workspace, int64_t num_seqs,
                              int64_t num_heads, int64_t block_size, int64_t max_blocks_per_seq,
                              int64_t query_stride, float scale, int num_splits,
                              cudaStream_t stream) {
  if (num_seqs == 0 || num_heads == 0) return cudaSuccess;
  constexpr size_t kBytes = Smem<T>::kBytes;
  // Above the default 48 KB of dynamic shared memory; set once per process (one device each).
  static const cudaError_t attribute = cudaFuncSetAttribute(
      mla_decode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kBytes));
  if (attribute != cudaSuccess) return attribute;
  const dim3 grid(static_cast<unsigned>((num_heads + kHeadTile - 1) / kHeadTile),
                  static_cast<unsigned>(num_seqs), static_cast<unsigned>(num_splits));
  float* partial_acc = workspace;
  float* partial_ml = workspace + num_seqs * num_heads * num_splits * kLatent;
  mla_decode_kernel<T><<<grid, kThreads, kBytes, stream>>>(
      out, query, latent_cache, cu_seqlens_q, seq_lens_k, block_tables, partial_acc, partial_ml,
      static_cast<int>(num_heads), static_cast<int>(block_size), static_cast<int>(max_blocks_per_seq),
      query_stride, scale * kLog2e, num_splits);
  if (num_splits > 1) {
    const dim3 combine_grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(num_heads));
    mla_decode_combine_kernel<T><<<combine_grid, kLatent, 0, stream>>>(
        out, partial_acc, partial_ml, cu_seqlens_q, seq_lens_k, static_cast<int>(num_heads), num_splits);
  }
  return cudaGetLastError();
}

#define FASTGEN_INSTANTIATE(T)                                                                   \
  template cudaError_t mla_decode_launch<T>(T*, const T*, const T*, const int32_t*, const int32_t*, \
                                            const int32_t*, float*, int64_t, int64_t, int64_t,     \
                                            int64_t, int64_t, float, int, cudaStream_t);
FASTGEN_INSTANTIATE(float)
FASTGEN_INSTANTIATE(__half)
FASTGEN_INSTANTIATE(__nv_bfloat16)
#undef FASTGEN_INSTANTIATE

}  // namespace fastgen::cuda
