"""Thin Python wrappers over the fastgen kernels (``torch.ops.fastgen.*``, built in csrc/).

Each wrapper allocates the output where the op writes into one and documents shapes; the kernels
check their inputs. Shape letters: T tokens, H hidden, Hq / Hkv query / KV heads, D head size,
N cache blocks, S block size, B sequences, M blocks per sequence, I / O a linear layer's input /
output features (in the MoE ops, I is an expert's intermediate size), E experts, k experts per
token.
The pure-PyTorch references the tests compare against are in ``fastgen.ops.reference``.
"""

from __future__ import annotations

import torch

import fastgen._C  # noqa: F401  (registers torch.ops.fastgen)

_ops = torch.ops.fastgen


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x**2) + eps) * weight.   x: [T, H]; weight: [H] -> [T, H]"""
    out = torch.empty_like(x)
    _ops.rms_norm.default(out, x, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    """In place: residual += x; x = rms_norm(residual) * weight.
    x, residual: [T, H]; weight: [H]"""
    _ops.fused_add_rms_norm.default(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:].   x: [T, 2I] -> [T, I]"""
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
    _ops.silu_and_mul.default(out, x)
    return out


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """Rotates query and key in place.   positions: [T] int64; query: [T, Hq * D];
    key: [T, Hkv * D]; cos_sin_cache: [P, R] float32 (cos | sin halves)."""
    _ops.rotary_embedding.default(positions, query, key, head_size, cos_sin_cache, is_neox)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key_cache.view(N * S, Hkv, D)[slot_mapping] = key (and value); negative slots (padding)
    are skipped.   key, value: [T, Hkv, D]; caches: [N, S, Hkv, D]; slot_mapping: [T] int64"""
    _ops.reshape_and_cache.default(key, value, key_cache, value_cache, slot_mapping)


def rotary_embedding_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, head_size: int, cos_sin_cache: torch.Tensor,
                               is_neox: bool, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               slot_mapping: torch.Tensor,
                               q_norm_weight: torch.Tensor | None = None,
                               k_norm_weight: torch.Tensor | None = None,
                               norm_eps: float = 1e-6) -> None:
    """rotary_embedding and reshape_and_cache in one pass: query is rotated in place, and each
    token's rotated key and its value go into its cache slot (negative slots are skipped); key
    itself is left unrotated. With q_norm_weight and k_norm_weight (both or neither), each query
    and key head is RMS-normalised with that weight first (Qwen3's and Llama 4's q/k norm),
    bitwise as rms_norm would.   positions: [T] int64; query: [T, Hq * D]; key, value:
    [T, Hkv * D]; cos_sin_cache: [P, R] float32; caches: [N, S, Hkv, D]; slot_mapping: [T] int64;
    q_norm_weight, k_norm_weight: [D]"""
    _ops.rotary_embedding_and_cache.default(positions, query, key, value, head_size,
                                            cos_sin_cache, is_neox, key_cache, value_cache,
                                            slot_mapping, q_norm_weight, k_norm_weight, norm_eps)


def mla_rotary_and_cache(positions: torch.Tensor, query: torch.Tensor, kv_a: torch.Tensor,
                         kv_norm_weight: torch.Tensor, norm_eps: float, head_size: int,
                         cos_sin_cache: torch.Tensor, is_neox: bool, latent_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    """DeepSeek MLA's rotary and cache write in one pass: the last R dims of each query head are
    rotated in place, and token t's latent-cache row becomes [rms_norm(kv_a[t, :L]) *
    kv_norm_weight | kv_a[t, L:] rotated] (negative slots are skipped; kv_a is only read).
    positions: [T] int64; query: [T, H * head_size]; kv_a: [T, L + R]; kv_norm_weight: [L];
    cos_sin_cache: [P, R] float32; latent_cache: [N, S, L + R]; slot_mapping: [T] int64"""
    _ops.mla_rotary_and_cache.default(positions, query, kv_a, kv_norm_weight, norm_eps,
                                      head_size, cos_sin_cache, is_neox, latent_cache,
                                      slot_mapping)


def attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              cu_seqlens_q: torch.Tensor, seq_lens_k: torch.Tensor, block_tables: torch.Tensor,
              max_seqlen_q: int, max_seqlen_k: int, scale: float,
              sliding_window: int | None = None, chunk_size: int | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal paged attention of packed queries (see the schema in csrc/torch_bindings.cpp).
    query: [T, Hq, D]; caches: [N, S, Hkv, D]; cu_seqlens_q: [B + 1] int32; seq_lens_k: [B] int32;
    block_tables: [B, M] int32; out (written when given): [T, Hq, D] -> [T, Hq, D]"""
    if out is None:
        out = torch.empty_like(query)
    _ops.attention.default(out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k,
                           block_tables, max_seqlen_q, max_seqlen_k, scale, sliding_window,
                           chunk_size)
    return out


def mla_attention(query: torch.Tensor, latent_cache: torch.Tensor, latent_size: int,
                  cu_seqlens_q: torch.Tensor, seq_lens_k: torch.Tensor,
                  block_tables: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                  scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek MLA's absorbed attention (see the mla_attention schema): causal paged attention of
    H query heads over one KV head whose latent-cache rows [c_kv | k_pe] (L + R wide) are the keys
    and whose first L = latent_size elements are the values. query: [T, H, L + R];
    latent_cache: [N, S, L + R]; metadata as attention's; out (written when given): [T, H, L]
    -> [T, H, L]"""
    if out is None:
        out = query.new_empty(query.shape[0], query.shape[1], latent_size)
    _ops.mla_attention.default(out, query, latent_cache, cu_seqlens_q, seq_lens_k, block_tables,
                               max_seqlen_q, max_seqlen_k, scale)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight^T + bias, accumulated in float32 (CPU only; on GPUs use F.linear).
    x: [T, I]; weight: [O, I]; bias: [O] -> [T, O] of out_dtype (x's dtype, or float32)"""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    _ops.linear.default(out, x, weight, bias)
    return out


def quant_linear(x: torch.Tensor, packed: torch.Tensor, qtype: int, n: int,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 out: torch.Tensor | None = None, portable: bool = False) -> torch.Tensor:
    """x @ W^T + bias for a block-quantized W [n, I] packed by fastgen.quantization.formats
    (GGML type id qtype), x quantized per 32 to int8 inside (see the quant_linear schema).
    x: [T, I]; bias: [n] float32; out (written when given, rows contiguous): [T, n]
    -> [T, n] of out_dtype (x's dtype, or float32). portable: the kernel for processors without
    AVX512-VNNI, which the CPU otherwise picks itself."""
    if out is None:
        out = torch.empty(x.shape[0], n, dtype=out_dtype or x.dtype, device=x.device)
    _ops.quant_linear.default(out, x, packed, qtype, n, bias, portable)
    return out


def quant_dequantize(packed: torch.Tensor, qtype: int, n: int, k: int,
                     dtype: torch.dtype = torch.float32,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a packed W [n, k] as gguf.quants.dequantize computes them: every row, or rows
    (int64 [R]) -> [n or R, k] of dtype"""
    out = torch.empty(n if rows is None else rows.shape[0], k, dtype=dtype, device=packed.device)
    _ops.quant_dequantize.default(out, packed, qtype, rows)
    return out


def moe_route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
              renormalize: bool = False, num_groups: int | None = None,
              topk_groups: int | None = None, group_scoring: str = "max",
              correction_bias: torch.Tensor | None = None,
              scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing (see the moe_route schema). scores = softmax(router_logits) ("softmax":
    Mixtral, Qwen2/3-MoE, DeepSeek-V2) or sigmoid(router_logits) ("sigmoid": Llama 4,
    DeepSeek-V3); the top_k experts by scores + correction_bias (selection only), among the
    topk_groups best of num_groups equal groups when given (group_scoring "max": DeepSeek-V2,
    "sum_top2": DeepSeek-V3); weights = their scores, renormalised to sum 1 when renormalize,
    times scale. Ties go to the lower expert index; ids in descending order of selection key.
    router_logits: [T, E] float32; correction_bias: [E] float32
    -> (topk_weights [T, k] float32, topk_ids [T, k] int32)"""
    num_tokens = router_logits.shape[0]
    topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    _ops.moe_route.default(topk_weights, topk_ids, router_logits, scoring, renormalize,
                           num_groups, topk_groups, group_scoring, correction_bias, scale)
    return topk_weights, topk_ids


def moe_align(topk_ids: torch.Tensor, num_experts: int,
              block_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The T * k (token, slot) pairs p = t * k + j sorted by expert (stable), each expert's run
    padded with the value T * k to a multiple of block_size, as a grouped GEMM over tiles of
    block_size rows reads them (see the moe_align schema). topk_ids: [T, k] int32
    -> (sorted_ids [T * k + E * (block_size - 1)] int32: expert e's run is
        sorted_ids[expert_offsets[e]:expert_offsets[e + 1]], padding and the tail T * k;
        expert_offsets [E + 1] int32: expert_offsets[E] is the padded total;
        tile_experts [ceil(sorted_ids.numel() / block_size)] int32: each tile's expert, -1 past
        the last)"""
    padded = topk_ids.numel() + num_experts * (block_size - 1)
    options = dict(dtype=torch.int32, device=topk_ids.device)
    sorted_ids = torch.empty(padded, **options)
    expert_offsets = torch.empty(num_experts + 1, **options)
    tile_experts = torch.empty(-(-padded // block_size), **options)
    _ops.moe_align.default(sorted_ids, expert_offsets, tile_experts, topk_ids, block_size)
    return sorted_ids, expert_offsets, tile_experts


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, weight_on_input: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts' SwiGLU MLPs, weighted and summed over each token's k slots, in slot
    order, accumulated in float32 (see the fused_moe schema):
        out[t] = sum_j w_j * expert_{id_j}(x[t])     (weight_on_input=False: Mixtral, Qwen, DeepSeek)
        out[t] = sum_j expert_{id_j}(w_j * x[t])     (weight_on_input=True: Llama 4)
        expert_e(x) = w2[e] @ (silu(w13[e, :I] @ x) * (w13[e, I:] @ x))
    x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]; topk_weights: [T, k]
    float32; topk_ids: [T, k] int32; out (written when given): [T, H] -> [T, H] in x's dtype"""
    if out is None:
        out = torch.empty_like(x)
    _ops.fused_moe.default(out, x, w13, w2, topk_weights, topk_ids, weight_on_input)
    return out


def quant_fused_moe(x: torch.Tensor, w13: torch.Tensor, w13_qtype: int, w2: torch.Tensor,
                    w2_qtype: int, inter: int, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, weight_on_input: bool = False, *,
                    max_stream_tokens: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """fused_moe over block-quantized experts, CPU only (see the quant_fused_moe schema): w13,
    w2 are every expert's quant_linear tiles stacked, uint8 [E, ceil(2I / 16), H / SB, chunk] and
    [E, ceil(H / 16), I / SB, chunk] of GGML types w13_qtype, w2_qtype; an expert with up to
    max_stream_tokens rows streams its weights, one with more is dequantized for oneDNN
    (the model passes fastgen.quantization.QUANT_MAX_TOKENS). x: [T, H]; topk_weights: [T, k] float32; topk_ids: [T, k] int32 -> [T, H] in x's dtype"""
    if out is None:
        out = torch.empty_like(x)
    _ops.quant_fused_moe.default(out, x, w13, w13_qtype, w2, w2_qtype, inter, topk_weights,
                                 topk_ids, weight_on_input, max_stream_tokens)
    return out


# ---- tensor-parallel collectives between the processes of one host (shared memory, CPU) -------

def shm_group_init(name: str, world_size: int, rank: int, buffer_bytes: int,
                   timeout_s: float) -> int:
    """Joins (rank 0: creates) the shared-memory group `name` of world_size processes; collective.
    Returns its handle for the calls below."""
    return _ops.shm_group_init.default(name, world_size, rank, buffer_bytes, timeout_s)


def shm_all_reduce(x: torch.Tensor, group: int) -> None:
    """x summed over the group's ranks in place, in float32 in rank order (the same bits on every
    rank).   x: contiguous float32 / float16 / bfloat16"""
    _ops.shm_all_reduce.default(x, group)


def shm_all_gather(out: torch.Tensor, x: torch.Tensor, group: int) -> None:
    """out[r] = rank r's x.   x: contiguous; out: [R, *x.shape] contiguous, x's dtype"""
    _ops.shm_all_gather.default(out, x, group)


def shm_barrier(group: int) -> None:
    """Returns once every rank of the group has called it."""
    _ops.shm_barrier.default(group)


def shm_broadcast_bytes(payload: torch.Tensor, group: int, patient: bool = False) -> torch.Tensor:
    """Rank 0's payload on every rank (the others pass any, e.g. an empty tensor); with patient
    the others wait for rank 0 without a time limit.   payload: uint8 [n] -> uint8 [n]"""
    return _ops.shm_broadcast_bytes.default(payload, group, patient)


def shm_group_destroy(group: int) -> None:
    """Unmaps this process's view of the group."""
    _ops.shm_group_destroy.default(group)


# ---- tensor-parallel collectives on CUDA (NCCL; CUDA builds only) -----------------------------

def _nccl_op(name: str):
    try:
        return getattr(_ops, name)
    except AttributeError:
        raise RuntimeError("this build of fastgen has no CUDA kernels, so no NCCL collectives "
                           "(rebuild with torch's CUDA wheel and nvcc on the PATH)") from None


def nccl_version() -> int:
    """The loaded NCCL's version code (e.g. 23007 for 2.30.7)."""
    return _nccl_op("nccl_version").default()


def nccl_unique_id() -> torch.Tensor:
    """A new communicator's id, made by its rank 0 for the others.   -> uint8 [128] (CPU)"""
    return _nccl_op("nccl_unique_id").default()


def nccl_init(unique_id: torch.Tensor, world_size: int, rank: int) -> int:
    """This rank's communicator on the current CUDA device; collective. Returns its handle."""
    return _nccl_op("nccl_init").default(unique_id, world_size, rank)


def nccl_destroy(comm: int) -> None:
    _nccl_op("nccl_destroy").default(comm)


def nccl_all_reduce(x: torch.Tensor, comm: int) -> None:
    """x summed over the communicator's ranks, in place, on the current stream.
    x: contiguous CUDA float32 / float16 / bfloat16"""
    _nccl_op("nccl_all_reduce").default(x, comm)


def nccl_all_gather(out: torch.Tensor, x: torch.Tensor, comm: int) -> None:
    """out[r] = rank r's x, on the current stream.   out: [R, *x.shape], x's dtype"""
    _nccl_op("nccl_all_gather").default(out, x, comm)
