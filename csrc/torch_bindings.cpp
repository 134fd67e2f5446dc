// Every fastgen op's schema, written once for all backends, and its CPU / CUDA implementations.
// Shape letters: T = tokens in the batch, B = sequences, H = hidden size, Hq / Hkv = query / KV
// heads, D = head size, R = rotary dims (<= D), N = cache blocks, S = block size, M = blocks per
// sequence in the block table, P = positions in the cos/sin cache, I / O = a linear layer's input /
// output features.
//
// Python reaches these as torch.ops.fastgen.<op>; importing the module runs the registrations.
#include <Python.h>
#include <torch/library.h>

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
  // left as it was. positions: [T] int64; query: [T, Hq * D]; key, value: [T, Hkv * D];
  // cos_sin_cache: [P, R] float32; caches: [N, S, Hkv, D]; slot_mapping: [T] int64
  m.def("rotary_embedding_and_cache(Tensor positions, Tensor! query, Tensor key, Tensor value, "
        "int head_size, Tensor cos_sin_cache, bool is_neox, Tensor! key_cache, "
        "Tensor! value_cache, Tensor slot_mapping) -> ()");
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
  // out = input @ weight^T + bias, accumulated in float32. CPU only (on GPUs F.linear is cuBLAS).
  // input: [T, I]; weight: [O, I] (nn.Linear's layout); bias: [O]; out: [T, O], of input's dtype
  // or float32 (e.g. fp32 logits from a bf16 LM head, rounded once).
  m.def("linear(Tensor! out, Tensor input, Tensor weight, Tensor? bias) -> ()");
}

#define FASTGEN_IMPL_OPS(m, ns)                              \
  m.impl("rms_norm", &ns::rms_norm);                                      \
  m.impl("fused_add_rms_norm", &ns::fused_add_rms_norm);                  \
  m.impl("silu_and_mul", &ns::silu_and_mul);                              \
  m.impl("rotary_embedding", &ns::rotary_embedding);                      \
  m.impl("reshape_and_cache", &ns::reshape_and_cache);                    \
  m.impl("rotary_embedding_and_cache", &ns::rotary_embedding_and_cache);  \
  m.impl("attention", &ns::attention);

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  FASTGEN_IMPL_OPS(m, fastgen::cpu)
  // CPU-only ops (no CUDA kernel: see ops.h).
  m.impl("linear", &fastgen::cpu::linear);
}

#ifdef FASTGEN_WITH_CUDA
TORCH_LIBRARY_IMPL(fastgen, CUDA, m) { FASTGEN_IMPL_OPS(m, fastgen::cuda) }
#endif

// `import fastgen._C` loads this library (running the registrations above); it has no Python API.
static struct PyModuleDef fastgen_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&fastgen_module); }
