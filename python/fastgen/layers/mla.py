"""Multi-head latent attention (DeepSeek-V2 / V3) over a latent paged KV cache.

Each token caches one row of L + R values shared by every head: the normalised latent
c_kv = RMSNorm(kv_a[:L]) (L = kv_lora_rank, 512) and the rotated rotary key k_pe (R =
qk_rope_head_dim, 64) — 1,152 bytes per token and layer in bf16, where per-head K and V would
take H * (P + R + V) * 2 (10,240 for V2-Lite's 16 heads). The heads' keys and values are
    k_h = [W_UK[h] c_kv | k_pe],   v_h = W_UV[h] c_kv,   kv_b_proj.weight = per head [W_UK; W_UV]
and attention never builds them: the key up-projection is absorbed into the query,
    q_h . k_h = (W_UK[h]^T q_nope_h) . c_kv + q_pe_h . k_pe = [q_lat_h | q_pe_h] . cache row,
which makes every head a query of one multi-query attention with head size L + R over the cache
rows, whose value is the row's first L entries (the mla_attention op); W_UV then maps each head's
L-wide result to its V outputs. The same absorbed form serves prefill and decode: on a CPU it is
faster than expanding per-head keys and values at every prefill length measured
(bench/kernels/bench_mla.py).

Shape letters: T tokens, H heads (per rank), P qk_nope_head_dim, R qk_rope_head_dim,
V v_head_dim, L kv_lora_rank.
"""

from __future__ import annotations

import torch

from fastgen import ops
from fastgen.layers.attention import AttentionLayer, ForwardBatch, LatentAttentionSpec
from fastgen.layers.rotary import RotaryEmbedding


class LatentAttention(AttentionLayer):
    """softmax(q k^T * scale) v of H heads over the latent cache, with W_UK absorbed into the
    query and W_UV applied after (see the module docstring). The rotary embedding rotates the last
    R dims of each query head and the cached k_pe."""

    def __init__(self, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, kv_lora_rank: int, scale: float, layer_index: int,
                 rotary_emb: RotaryEmbedding):
        super().__init__(layer_index)
        if rotary_emb.rotary_dim != qk_rope_head_dim:
            raise ValueError(f"rotary dim {rotary_emb.rotary_dim} != qk_rope_head_dim "
                             f"{qk_rope_head_dim}")
        self.num_heads = num_heads
        self.nope_dim, self.rope_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.latent_size = kv_lora_rank
        self.scale = scale
        self.rotary_emb = rotary_emb

    def kv_cache_spec(self, dtype: torch.dtype) -> LatentAttentionSpec:
        return LatentAttentionSpec(dtype, self.latent_size, self.rope_dim)

    def forward(self, q: torch.Tensor, kv_a: torch.Tensor, kv_norm_weight: torch.Tensor,
                kv_norm_eps: float, w_uk: torch.Tensor, w_uv_t: torch.Tensor,
                positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q: [T, H * (P + R)] (rotated in place); kv_a: [T, L + R], kv_a_proj_with_mqa's output
        (only read); kv_norm_weight: [L]; w_uk: [H, P, L]; w_uv_t: [H, L, V];
        positions: [T] int64 -> [T, H * V]"""
        tokens, heads, latent = q.shape[0], self.num_heads, self.latent_size
        cache = batch.kv_caches[self.layer_index]  # [N, S, L + R]
        meta = batch.attn_metadata
        rope = self.rotary_emb
        ops.mla_rotary_and_cache(positions, q, kv_a, kv_norm_weight, kv_norm_eps,
                                 self.nope_dim + self.rope_dim, rope.cos_sin_cache, rope.is_neox,
                                 cache, meta.slot_mapping)
        q = q.view(tokens, heads, self.nope_dim + self.rope_dim)
        q_lat = torch.bmm(q[..., :self.nope_dim].transpose(0, 1), w_uk)  # [H, T, L]
        query = torch.cat((q_lat.transpose(0, 1), q[..., self.nope_dim:]), dim=-1)  # [T, H, L + R]
        out = ops.mla_attention(query, cache, latent, meta.cu_seqlens_q, meta.seq_lens_k,
                                meta.block_tables, meta.max_seqlen_q, meta.max_seqlen_k,
                                self.scale)  # [T, H, L]
        o = torch.bmm(out.transpose(0, 1), w_uv_t)  # [H, T, V]
        return o.transpose(0, 1).reshape(tokens, heads * self.v_head_dim)
