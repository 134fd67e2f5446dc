// Paged prefill attention on tensor cores (sm_80+): FlashAttention-2's forward, over packed
// variable-length queries and the paged KV cache (prefill, chunked prefill, prefix-cached
// prefill: a sequence's queries are the last q_len of its k_len cached tokens).
//
// One CTA of 4 warps takes kBlockM = 64 query rows of one sequence and one query head; each warp
// owns 16 rows. Per tile of kBlockN = 64 keys:
//   * K and V rows are gathered from their cache pages into shared memory with cp.async (16 bytes
//     per instruction, zero-filled past the visible range), double-buffered: tile n + 1 loads
//     while tile n computes.
//   * S = Q K^T with mma.sync m16n8k16 (bf16 / fp16 in, fp32 out): Q stays in shared memory for
//     the whole CTA, and both Q's A fragments and K's B fragments come from ldmatrix.
//   * Online softmax on the S fragments in registers (each thread holds 2 rows x 16 columns; a
//     row's 4 threads reduce with two shuffles), in the log2 domain; the mask (causal, sliding
//     window, local chunk) is applied only on tiles that need it.
//   * P is repacked from S's accumulator layout straight into A fragments (the layouts agree), and
//     O += P V takes V's B fragments from ldmatrix.trans.
// Shared memory rows are 16-byte chunks XOR-swizzled by row, so ldmatrix's 8 row addresses hit 8
// different bank groups. The grid is (ceil(max_seqlen_q / 64), sequences, query heads): it
// depends only on host ints, and CTAs past their sequence's queries exit at once.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/attention_mask.h"
#include "cuda/attention.h"
#include "cuda/common.cuh"

namespace fastgen::cuda {

namespace {

constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kThreads = kWarps * 32;

// ---- PTX wrappers -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; valid = false writes zeros.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as one register of two 16-bit values, the lower column in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// ---- shared memory tiles ------------------------------------------------------------------------

// A [rows, HEAD_DIM] tile: row r's 16-byte chunk c lives at chunk c ^ (r % 8).
template <typename T, int HEAD_DIM>
struct Tile {
  static constexpr int kChunks = HEAD_DIM / 8;  // 16-byte chunks per row
  __device__ __forceinline__ static T* chunk(T* base, int row, int c) {
    return base + row * HEAD_DIM + ((c ^ (row % 8)) * 8);
  }
};

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads)
prefill_attention_kernel(T* __restrict__ out,                       // [num_tokens, num_heads, HEAD_DIM]
                         const T* __restrict__ query,               // [num_tokens, num_heads, HEAD_DIM]
                         const T* __restrict__ key_cache,           // [N, block_size, num_kv_heads, HEAD_DIM]
                         const T* __restrict__ value_cache,         // [N, block_size, num_kv_heads, HEAD_DIM]
                         const int32_t* __restrict__ cu_seqlens_q,  // [num_seqs + 1]
                         const int32_t* __restrict__ seq_lens_k,    // [num_seqs]
                         const int32_t* __restrict__ block_tables,  // [num_seqs, max_blocks_per_seq]
                         int num_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,
                         int64_t query_stride, float scale_log2, int64_t window, int64_t chunk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync on bf16 needs sm_80; the adapter never launches this on older GPUs
#else
  using Smem = Tile<T, HEAD_DIM>;
  constexpr int kChunks = Smem::kChunks;
  constexpr int kDimTiles = HEAD_DIM / 8;    // n-tiles of O
  constexpr int kDimSteps = HEAD_DIM / 16;   // k-steps of S = Q K^T
  constexpr int kKeyTiles = kBlockN / 8;     // n-tiles of S
  constexpr int kKeySteps = kBlockN / 16;    // k-steps of O += P V

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);         // [kBlockM, HEAD_DIM]
  T* s_k = s_q + kBlockM * HEAD_DIM;               // [2][kBlockN, HEAD_DIM]
  T* s_v = s_k + 2 * kBlockN * HEAD_DIM;           // [2][kBlockN, HEAD_DIM]

  const int seq = blockIdx.y, head = blockIdx.z;
  const int q_begin = cu_seqlens_q[seq];
  const int q_len = cu_seqlens_q[seq + 1] - q_begin;
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= q_len) return;
  const int64_t k_len = seq_lens_k[seq];
  const int kv_head = head / (num_heads / num_kv_heads);
  const int32_t* block_table = block_tables + static_cast<int64_t>(seq) * max_blocks_per_seq;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // Positions of this CTA's first and last real query, and the keys any of them sees.
  const int64_t pos0 = k_len - q_len + m0;
  const int64_t pos_last = k_len - q_len + min(m0 + kBlockM, q_len) - 1;
  const int64_t key_begin = first_visible_key(pos0, window, chunk) / kBlockN * kBlockN;
  const int64_t key_end = pos_last + 1;  // exclusive
  const int num_tiles = static_cast<int>((key_end - key_begin + kBlockN - 1) / kBlockN);

  // Gathers key/value rows [n0, n0 + kBlockN) into buffer `buf` (zeros past key_end).
  auto load_kv = [&](int64_t n0, int buf) {
    T* k_dst = s_k + buf * kBlockN * HEAD_DIM;
    T* v_dst = s_v + buf * kBlockN * HEAD_DIM;
    for (int i = tid; i < kBlockN * kChunks; i += kThreads) {
      const int row = i / kChunks, c = i % kChunks;
      const int64_t j = n0 + row;
      const bool valid = j < key_end;
      int64_t offset = 0;
      if (valid) {
        const int key = static_cast<int>(j);
        const int64_t slot = static_cast<int64_t>(block_table[key / block_size]) * block_size + key % block_size;
        offset = (slot * num_kv_heads + kv_head) * HEAD_DIM + c * 8;
      }
      cp_async_16(Smem::chunk(k_dst, row, c), key_cache + offset, valid);
      cp_async_16(Smem::chunk(v_dst, row, c), value_cache + offset, valid);
    }
  };

  // Q tile (rows past q_len are zeros) and the first K/V tile, in one group.
  for (int i = tid; i < kBlockM * kChunks; i += kThreads) {
    const int row = i / kChunks, c = i % kChunks;
    const bool valid = m0 + row < q_len;
    const T* src = query + (valid ? (q_begin + m0 + row) * query_stride + static_cast<int64_t>(head) * HEAD_DIM + c * 8 : 0);
    cp_async_16(Smem::chunk(s_q, row, c), src, valid);
  }
  load_kv(key_begin, 0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // Q's A fragments come from shared memory at each k-step (kept in registers they would push
  // the O and S accumulators into spills at head size 128): warp w owns rows 16w..16w+15.
  const int q_row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;

  // This thread's two rows (lane / 4 and lane / 4 + 8 of the warp's 16) and their positions.
  const int row_in_warp = lane / 4;
  int64_t pos[2];
  pos[0] = pos0 + warp * 16 + row_in_warp;
  pos[1] = pos[0] + 8;
  int64_t first[2] = {first_visible_key(pos[0], window, chunk), first_visible_key(pos[1], window, chunk)};
  float o[kDimTiles][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int buf = tile % 2;
    const int64_t n0 = key_begin + static_cast<int64_t>(tile) * kBlockN;
    if (tile + 1 < num_tiles) load_kv(n0 + kBlockN, buf ^ 1);
    cp_async_commit();
    const T* k_tile = s_k + buf * kBlockN * HEAD_DIM;
    const T* v_tile = s_v + buf * kBlockN * HEAD_DIM;

    // S = Q K^T for the warp's 16 rows x kBlockN keys.
    float s[kKeyTiles][4] = {};
#pragma unroll
    for (int ks = 0; ks < kDimSteps; ++ks) {
      uint32_t a[4];  // Q rows of the warp, dims 16ks..16ks+15
      ldmatrix_x4(a, Smem::chunk(s_q, q_row, ks * 2 + lane / 16));
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; nt += 2) {
        uint32_t b[4];  // b[0], b[1]: key n-tile nt; b[2], b[3]: nt + 1
        const int key_row = nt * 8 + (lane % 8) + (lane / 16) * 8;
        ldmatrix_x4(b, Smem::chunk(const_cast<T*>(k_tile), key_row, ks * 2 + (lane / 8) % 2));
        mma_16816<T>(s[nt], a, b[0], b[1]);
        mma_16816<T>(s[nt + 1], a, b[2], b[3]);
      }
    }

    // Scale into the log2 domain and mask where some (row, key) pair of the CTA is not visible.
    const bool full = n0 + kBlockN - 1 <= pos0 && n0 >= first_visible_key(pos_last, window, chunk);
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[nt][e] * scale_log2;
        if (!full) {
          const int r = e / 2;
          const int64_t j = n0 + nt * 8 + (lane % 4) * 2 + e % 2;
          if (j > pos[r] || j < first[r]) v = -INFINITY;
        }
        s[nt][e] = v;
      }
    }

    // Online softmax per row: the row's 4 threads (lanes 4q..4q+3) share its 64 columns.
    float scale_o[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;  // a row with nothing visible yet
      scale_o[r] = exp2f(row_max[r] - base);         // 0 when the old max was -inf
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * scale_o[r] + sum;  // the thread's partial sum; reduced at the end
    }
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
      o[dt][0] *= scale_o[0];
      o[dt][1] *= scale_o[0];
      o[dt][2] *= scale_o[1];
      o[dt][3] *= scale_o[1];
    }

    // O += P V: P's A fragment for keys 16kk..16kk+15 is S's n-tiles 2kk and 2kk + 1.
#pragma unroll
    for (int kk = 0; kk < kKeySteps; ++kk) {
      const uint32_t p[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < kDimTiles; dt += 2) {
        uint32_t b[4];  // b[0], b[1]: dims 8dt..8dt+7; b[2], b[3]: the next 8
        const int key_row = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        ldmatrix_x4_trans(b, Smem::chunk(const_cast<T*>(v_tile), key_row, dt + lane / 16));
        mma_16816<T>(o[dt], p, b[0], b[1]);
        mma_16816<T>(o[dt + 1], p, b[2], b[3]);
      }
    }

    cp_async_wait_all();
    __syncthreads();  // the next tile is in, and nobody reads this buffer any more
  }

  // Normalise and write the warp's real rows.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int row = m0 + warp * 16 + row_in_warp + 8 * r;
    if (row >= q_len) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    T* out_row = out + (static_cast<int64_t>(q_begin + row) * num_heads + head) * HEAD_DIM;
#pragma unroll
    for (int dt = 0; dt < kDimTiles; ++dt) {
      const uint32_t v = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
      *reinterpret_cast<uint32_t*>(out_row + dt * 8 + (lane % 4) * 2) = v;
    }
  }
#endif
}

}  // namespace

template <typename T, int HEAD_DIM>
cudaError_t prefill_attention_launch(T* out, const T* query, const T* key_cache,
                                     const T* value_cache, const int32_t* cu_seqlens_q,
                                     const int32_t* seq_lens_k, const int32_t* block_tables,
                                     int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                     int64_t block_size, int64_t max_blocks_per_seq,
                                     int64_t max_seqlen_q, int64_t query_stride, float scale,
                                     std::optional<int64_t> sliding_window,
                                     std::optional<int64_t> chunk_size, cudaStream_t stream) {
  if (num_seqs == 0 || max_seqlen_q == 0) return cudaSuccess;
  constexpr int smem = (kBlockM + 4 * kBlockN) * HEAD_DIM * static_cast<int>(sizeof(T));
  auto kernel = prefill_attention_kernel<T, HEAD_DIM>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>((max_seqlen_q + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>(num_seqs), static_cast<unsigned>(num_heads));
  kernel<<<grid, kThreads, smem, stream>>>(
      out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k, block_tables,
      static_cast<int>(num_heads), static_cast<int>(num_kv_heads), static_cast<int>(block_size),
      static_cast<int>(max_blocks_per_seq), query_stride, scale * kLog2e,
      sliding_window.value_or(kUnbounded), chunk_size.value_or(kUnbounded));
  return cudaGetLastError();
}

#define FASTGEN_INSTANTIATE(T, D)                                                                 \
  template cudaError_t prefill_attention_launch<T, D>(                                           \
      T*, const T*, const T*, const T*, const int32_t*, const int32_t*, const int32_t*, int64_t, \
      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, std::optional<int64_t>,       \
      std::optional<int64_t>, cudaStream_t);
FASTGEN_INSTANTIATE(__half, 64)
FASTGEN_INSTANTIATE(__half, 128)
FASTGEN_INSTANTIATE(__nv_bfloat16, 64)
FASTGEN_INSTANTIATE(__nv_bfloat16, 128)
#undef FASTGEN_INSTANTIATE

}  // namespace fastgen::cuda
