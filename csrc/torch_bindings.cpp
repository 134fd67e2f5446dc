// Every fastgen op's schema, written once for all backends, and its CPU / CUDA implementations.
// Shape letters: T = tokens in the batch, B = sequences, H = hidden size, Hq / Hkv = query / KV
// heads, D = head size, R = rotary dims (<= D), N = cache blocks, S = block size, M = blocks per
// sequence in the block table, P = positions in the cos/sin cache, I / O = a linear layer's input /
// output features (in the MoE ops, I is an expert's intermediate size), E = experts, k = experts
// per token.
//
// Python reaches these as torch.ops.fastgen.<op>; importing the module runs the registrations.
#include <Python.h>
#include <torch/library.h>

#include "cpu/shm_comm.h"
#ifdef FASTGEN_WITH_CUDA
#include "cuda/nccl.h"
#endif
#include "ops.h"

TORCH_LIBRARY(fastgen, m) {
  // out = input / sqrt(mean(input^2) + epsilon) * weight.   out, input: [T, H]; weight: [H]
  m.def("rms_norm(Tensor! out, Tensor input, Tensor weight, float epsilon) -> ()");
  // residual = input + residual; input = rms_norm(residual) * weight, in one pass.
  // input, residual: [T, H]; weight: [H]
  m.def("fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()");
  // out = silu(input[..., :I]) * input[..., I:].   input: [T, 2I]; out: [T, I]
  m.def("silu_and_mul(Tensor! out, Tensor input) -> ()");
  // Rotates the first R dims of every head of query and key in place, by the angle of each
  // token's position. positions: [T] int64; query: [T, Hq * D]; key: [T, Hkv * D];
  // cos_sin_cache: [P, R] float32, cos in [:, :R/2] and sin in [:, R/2:].
  // is_neox: rotate-half layout (Llama, HF); otherwise GPT-J interleaved pairs.
  m.def("rotary_embedding(Tensor positions, Tensor! query, Tensor! key, int head_size, "
        "Tensor cos_sin_cache, bool is_neox) -> ()");
  // Writes each token's key / value into its slot of the paged cache (slot = block * S + offset);
  // a negative slot is padding (a CUDA graph's unused rows) and is skipped.
  // key, value: [T, Hkv, D]; key_cache, value_cache: [N, S, Hkv, D]; slot_mapping: [T] int64
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
        "Tensor slot_mapping) -> ()");
  // rotary_embedding and reshape_and_cache in one pass: query is rotated in place, and each
  // token's rotated key and its value are written into its cache slot (negative: skipped); key is
  // left as it was. With q_norm_weight and k_norm_weight (both or neither), each query and key
  // head is RMS-normalised with that weight (epsilon norm_eps) before it is rotated: Qwen3's and
  // Llama 4's per-head q/k norm in the same pass. positions: [T] int64; query: [T, Hq * D];
  // key, value: [T, Hkv * D]; cos_sin_cache: [P, R] float32; caches: [N, S, Hkv, D];
  // slot_mapping: [T] int64; q_norm_weight, k_norm_weight: [D]
  m.def("rotary_embedding_and_cache(Tensor positions, Tensor! query, Tensor key, Tensor value, "
        "int head_size, Tensor cos_sin_cache, bool is_neox, Tensor! key_cache, "
        "Tensor! value_cache, Tensor slot_mapping, Tensor? q_norm_weight=None, "
        "Tensor? k_norm_weight=None, float norm_eps=1e-6) -> ()");
  // DeepSeek's multi-head latent attention, its per-token cache write: the last R = rot_dim
  // dims of each query head are rotated in place, and token t's row of the latent cache becomes
  // [rms_norm(kv_a[t, :L]) * kv_norm_weight | kv_a[t, L:] rotated] (negative slot: skipped); kv_a
  // is only read. positions: [T] int64; query: [T, H * head_size]; kv_a: [T, L + R];
  // kv_norm_weight: [L]; cos_sin_cache: [P, R] float32; latent_cache: [N, S, L + R];
  // slot_mapping: [T] int64
  m.def("mla_rotary_and_cache(Tensor positions, Tensor! query, Tensor kv_a, "
        "Tensor kv_norm_weight, float norm_eps, int head_size, Tensor cos_sin_cache, "
        "bool is_neox, Tensor! latent_cache, Tensor slot_mapping) -> ()");
  // Causal attention of packed variable-length queries over a paged KV cache: prefill, chunked
  // prefill and decode in one op. Sequence b's queries are rows cu_seqlens_q[b]..cu_seqlens_q[b+1]
  // and are the last q_len of its seq_lens_k[b] cached keys, so query i sits at position
  // p = seq_lens_k[b] - q_len + i and sees keys j <= p, with p - j < sliding_window and
  // j // chunk_size == p // chunk_size when those are given. Grouped-query: Hq % Hkv == 0.
  // out, query: [T, Hq, D]; key_cache, value_cache: [N, S, Hkv, D]; cu_seqlens_q: [B + 1] int32;
  // seq_lens_k: [B] int32; block_tables: [B, M] int32
  m.def("attention(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
        "Tensor cu_seqlens_q, Tensor seq_lens_k, Tensor block_tables, int max_seqlen_q, "
        "int max_seqlen_k, float scale, int? sliding_window, int? chunk_size) -> ()");
  // DeepSeek MLA's absorbed attention over the latent cache: `attention` with one KV head whose
  // rows of L + R elements are the keys and whose first L elements are the values (the query's
  // heads carry W_UK already; see python/fastgen/layers/mla.py), causal as `attention` is.
  // out: [T, H, L]; query: [T, H, L + R]; latent_cache: [N, S, L + R]; metadata as `attention`'s
  m.def("mla_attention(Tensor! out, Tensor query, Tensor latent_cache, Tensor cu_seqlens_q, "
        "Tensor seq_lens_k, Tensor block_tables, int max_seqlen_q, int max_seqlen_k, "
        "float scale) -> ()");
  // out = input @ weight^T + bias, accumulated in float32. CPU only (on GPUs F.linear is cuBLAS).
  // input: [T, I]; weight: [O, I] (nn.Linear's layout); bias: [O]; out: [T, O], of input's dtype
  // or float32 (e.g. fp32 logits from a bf16 LM head, rounded once).
  m.def("linear(Tensor! out, Tensor input, Tensor weight, Tensor? bias) -> ()");
  // out = input @ W^T + bias for a block-quantized W [n, K] (GGUF Q4_0, Q4_1, Q8_0, Q4_K, Q5_K,
  // Q6_K by GGML type id qtype), in csrc/core/quant_format.h's tiles: packed uint8
  // [ceil(n / 16), K / SB, chunk_bytes]. The input is quantized per 32 to int8, the products
  // summed exactly in int32 per group and scaled in float32. input: [T, K]; bias: [n] float32;
  // out: [T, n] of input's dtype or float32, rows contiguous (a column slice of a wider output is
  // fine). portable: on the CPU, the kernel for processors without AVX512-VNNI. On CUDA the
  // activations stay in float (csrc/cuda/quant.cu).
  m.def("quant_linear(Tensor! out, Tensor input, Tensor packed, int qtype, int n, Tensor? bias, "
        "bool portable=False) -> ()");
  // out[i] = row rows[i] of the packed W (every row in order without rows), as
  // gguf.quants.dequantize computes it. out: [R, K] float; rows: [R] int64
  m.def("quant_dequantize(Tensor! out, Tensor packed, int qtype, Tensor? rows) -> ()");
  // fused_moe's sum over block-quantized experts, CPU only: w13 [E, ceil(2I / 16), H / SB, chunk]
  // and w2 [E, ceil(H / 16), I / SB, chunk] uint8 are every expert's quant_linear tiles, stacked
  // (types w13_qtype, w2_qtype); inter = I. An expert with up to max_stream_tokens rows streams
  // its weights through quant_linear's kernel, one with more is dequantized and goes through
  // oneDNN. The gate/up output and the activation are rounded to x's dtype, the down output kept
  // in float32, and the k slots combined as fused_moe combines them.
  m.def("quant_fused_moe(Tensor! out, Tensor x, Tensor w13, int w13_qtype, Tensor w2, int w2_qtype, "
        "int inter, Tensor topk_weights, Tensor topk_ids, bool weight_on_input, "
        "int max_stream_tokens) -> ()");
  // Mixture-of-experts routing, in float32, per token: scores = softmax(router_logits) over the
  // E experts, or sigmoid(router_logits) (scoring "softmax" | "sigmoid"); selection keys = scores
  // + correction_bias (when given: DeepSeek-V3, it selects only); with num_groups, the experts
  // split into num_groups equal groups, ranked by their best key (group_scoring "max") or the sum
  // of their two best ("sum_top2"), and only the topk_groups best groups' experts stay eligible.
  // topk_ids = the k eligible experts of the largest keys, in descending order of key (ties: the
  // lower expert index), topk_weights = their scores, divided by their sum when renormalize, times
  // scale. router_logits: [T, E] float32; topk_weights: [T, k] float32; topk_ids: [T, k] int32;
  // correction_bias: [E] float32
  m.def("moe_route(Tensor! topk_weights, Tensor! topk_ids, Tensor router_logits, str scoring, "
        "bool renormalize, int? num_groups, int? topk_groups, str group_scoring, "
        "Tensor? correction_bias, float scale) -> ()");
  // The T * k (token, slot) pairs p = t * k + j sorted by expert topk_ids[t, j] (stable), each
  // expert's run padded with the value T * k to a multiple of block_size: expert e's run is
  // sorted_ids[expert_offsets[e] : expert_offsets[e + 1]], expert_offsets[E] the padded total
  // (entries past it are T * k too), tile_experts[i] the expert of tile i (sorted_ids[i * block_size :
  // (i + 1) * block_size]), -1 past the last tile. Ids must be in [0, E), or -1 for a pair with no
  // expert here (expert parallelism: routed to another rank's), which is left out: the CPU checks
  // them, the CUDA kernel skips any outside [0, E) (there is no sync to check them). A skipped
  // pair adds nothing to fused_moe's out. topk_ids: [T, k] int32;
  // sorted_ids: [T * k + E * (block_size - 1)] int32; expert_offsets: [E + 1] int32;
  // tile_experts: [ceil(sorted_ids.size(0) / block_size)] int32
  m.def("moe_align(Tensor! sorted_ids, Tensor! expert_offsets, Tensor! tile_experts, "
        "Tensor topk_ids, int block_size) -> ()");
  // The experts' SwiGLU MLPs, weighted and summed over each token's k slots:
  //   out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])   (weight_on_input false)
  //   out[t] = sum_j expert_{topk_ids[t, j]}(topk_weights[t, j] * x[t])  (true: Llama 4)
  //   expert_e(x) = w2[e] @ (silu(w13[e, :I] @ x) * (w13[e, I:] @ x)),
  // accumulated in float32 (the activation rounded to x's dtype), the k slots summed in slot order
  // without atomics: a token's output does not depend on the rest of the batch on a given path.
  // Ids as moe_align's. x, out: [T, H]; w13: [E, 2I, H]; w2: [E, H, I]; topk_weights: [T, k]
  // float32; topk_ids: [T, k] int32
  m.def("fused_moe(Tensor! out, Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, "
        "Tensor topk_ids, bool weight_on_input) -> ()");

  // Tensor-parallel collectives between the processes of one host, through shared memory (CPU;
  // csrc/cpu/shm_comm.h). shm_group_init is collective over the group's world_size processes:
  // rank 0 creates the segment `name`, every rank maps it; it returns the group's handle. Each
  // collective is called by every rank in the same order with tensors of the same shape: x is
  // summed in place in float32, in rank order (bitwise the same on every rank); out [R * numel]
  // gets rank r's x at r * numel. A peer that exited, or that does not arrive within timeout_s,
  // is an error on every rank waiting for it.
  m.def("shm_group_init(str name, int world_size, int rank, int buffer_bytes, float timeout_s) -> int",
        &fastgen::cpu::shm_group_init);
  m.def("shm_group_destroy(int group) -> ()", &fastgen::cpu::shm_group_destroy);
  m.def("shm_barrier(int group) -> ()", &fastgen::cpu::shm_barrier);
  // Rank 0's payload on every rank (the engine's per-step input); patient: no time limit on the
  // others' wait for rank 0, whose exit is still an error at once.
  m.def("shm_broadcast_bytes(Tensor payload, int group, bool patient) -> Tensor",
        &fastgen::cpu::shm_broadcast_bytes);
  m.def("shm_all_reduce(Tensor! x, int group) -> ()");
  m.def("shm_all_gather(Tensor! out, Tensor x, int group) -> ()");
}

#ifdef FASTGEN_WITH_CUDA
// Tensor-parallel collectives on CUDA through NCCL (csrc/cuda/nccl.h), in CUDA builds only.
// nccl_init is collective over the group's world_size processes, each on its own current device,
// with rank 0's nccl_unique_id (uint8 [128], carried by the caller); it returns a handle. The
// collectives run on the current stream (capturable in a CUDA graph, uniformly on every rank):
// x summed in place; out [R * numel] gets rank r's x at r * numel.
TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.def("nccl_version() -> int", &fastgen::cuda::nccl_version);
  m.def("nccl_unique_id() -> Tensor", &fastgen::cuda::nccl_unique_id);
  m.def("nccl_init(Tensor unique_id, int world_size, int rank) -> int", &fastgen::cuda::nccl_init);
  m.def("nccl_destroy(int comm) -> ()", &fastgen::cuda::nccl_destroy);
  m.def("nccl_all_reduce(Tensor! x, int comm) -> ()");
  m.def("nccl_all_gather(Tensor! out, Tensor x, int comm) -> ()");
}
#endif

#define FASTGEN_IMPL_OPS(m, ns)                              \
  m.impl("rms_norm", &ns::rms_norm);                                      \
  m.impl("fused_add_rms_norm", &ns::fused_add_rms_norm);                  \
  m.impl("silu_and_mul", &ns::silu_and_mul);                              \
  m.impl("rotary_embedding", &ns::rotary_embedding);                      \
  m.impl("reshape_and_cache", &ns::reshape_and_cache);                    \
  m.impl("rotary_embedding_and_cache", &ns::rotary_embedding_and_cache);  \
  m.impl("mla_rotary_and_cache", &ns::mla_rotary_and_cache);              \
  m.impl("attention", &ns::attention);                                    \
  m.impl("mla_attention", &ns::mla_attention);                            \
  m.impl("moe_route", &ns::moe_route);                                    \
  m.impl("moe_align", &ns::moe_align);                                    \
  m.impl("fused_moe", &ns::fused_moe);                                    \
  m.impl("quant_linear", &ns::quant_linear);                              \
  m.impl("quant_dequantize", &ns::quant_dequantize);

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  FASTGEN_IMPL_OPS(m, fastgen::cpu)
  // CPU-only ops (no CUDA kernel: see ops.h).
  m.impl("linear", &fastgen::cpu::linear);
  m.impl("quant_fused_moe", &fastgen::cpu::quant_fused_moe);
  m.impl("shm_all_reduce", &fastgen::cpu::shm_all_reduce);
  m.impl("shm_all_gather", &fastgen::cpu::shm_all_gather);
}

#ifdef FASTGEN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastgen, CUDA, m) {
  FASTGEN_IMPL_OPS(m, fastgen::cuda)
  m.impl("nccl_all_reduce", &fastgen::cuda::nccl_all_reduce);
  m.impl("nccl_all_gather", &fastgen::cuda::nccl_all_gather);
}
#endif

// `import fastgen._C` loads this library (running the registrations above); it has no Python API.
static struct PyModuleDef fastgen_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&fastgen_module); }
