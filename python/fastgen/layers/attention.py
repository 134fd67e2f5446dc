"""Paged attention as a layer: write this step's keys and values into the cache, then attend over
everything cached. With a rotary embedding the layer rotates q and k on the way, in the same
kernel as the cache write (the rotated key goes straight to its slot). The batch's metadata
travels as one explicit AttentionMetadata object that the model runner builds once per forward
pass and every layer reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastgen import ops
from fastgen.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Where a packed batch's tokens live in the paged cache. B sequences, T tokens in all.

    Sequence b contributes query rows cu_seqlens_q[b]..cu_seqlens_q[b+1] (its new tokens) and has
    seq_lens_k[b] tokens cached once they are written (its new tokens are the last of those)."""

    slot_mapping: torch.Tensor   # [T] int64: cache slot (block * block_size + offset) of each new token
    cu_seqlens_q: torch.Tensor   # [B + 1] int32
    seq_lens_k: torch.Tensor     # [B] int32
    block_tables: torch.Tensor   # [B, M] int32: cache blocks of each sequence, in order
    max_seqlen_q: int
    max_seqlen_k: int


KVCache = tuple[torch.Tensor, torch.Tensor]  # (key_cache, value_cache), each [N, S, Hkv, D]


class Attention(nn.Module):
    """softmax(q k^T * scale) v over the paged cache, causal, with grouped-query heads and an
    optional sliding window (Mistral) or local-chunk restriction (Llama 4). With rotary_emb, q and
    k are rotated by their positions first."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 sliding_window: int | None = None, chunk_size: int | None = None,
                 rotary_emb: RotaryEmbedding | None = None):
        super().__init__()
        if rotary_emb is not None and rotary_emb.head_size != head_size:
            raise ValueError(f"rotary head size {rotary_emb.head_size} != attention head size "
                             f"{head_size}")
        self.rotary_emb = rotary_emb
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV groups")
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale = scale
        self.sliding_window = sliding_window
        self.chunk_size = chunk_size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, positions: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, Hq * D]; k, v: [T, Hkv * D]; positions: [T] int64 (with rotary_emb)
        -> [T, Hq * D]. q is rotated in place; k is only read."""
        tokens = q.shape[0]
        key_cache, value_cache = kv_cache
        if self.rotary_emb is not None:
            rope = self.rotary_emb
            ops.rotary_embedding_and_cache(positions, q, k, v, self.head_size, rope.cos_sin_cache,
                                           rope.is_neox, key_cache, value_cache, meta.slot_mapping)
        else:
            ops.reshape_and_cache(k.view(tokens, self.num_kv_heads, self.head_size),
                                  v.view(tokens, self.num_kv_heads, self.head_size),
                                  key_cache, value_cache, meta.slot_mapping)
        out = ops.attention(q.view(tokens, self.num_heads, self.head_size), key_cache, value_cache,
                            meta.cu_seqlens_q, meta.seq_lens_k, meta.block_tables,
                            meta.max_seqlen_q, meta.max_seqlen_k, self.scale,
                            self.sliding_window, self.chunk_size)
        return out.view(tokens, self.num_heads * self.head_size)


@dataclass(frozen=True)
class KVCacheSpec:
    """What one layer's paged cache holds per token: num_kv_heads x head_size values, for each of
    num_layers layers. Read off the model's Attention layers, so it is per tensor-parallel rank."""

    num_layers: int
    num_kv_heads: int
    head_size: int


def kv_cache_spec(model: nn.Module) -> KVCacheSpec:
    """The KV cache a model needs: one (key, value) pair per Attention layer, in forward order."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Attention layers")
    shapes = {(m.num_kv_heads, m.head_size) for m in layers}
    if len(shapes) > 1:
        raise ValueError(f"Attention layers disagree on (KV heads, head size): {sorted(shapes)}")
    (num_kv_heads, head_size), = shapes
    return KVCacheSpec(len(layers), num_kv_heads, head_size)

