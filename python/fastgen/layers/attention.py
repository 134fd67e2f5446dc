"""Paged attention as a layer, the KV cache each attention layer declares, and the ForwardBatch
that carries a step's cache views and metadata to every layer.

Each attention layer says what its cache holds per token (a KVCacheSpec): full attention keeps K
and V of num_kv_heads x head_size values, an MLA layer one latent vector with no separate V. The
engine sizes the cache from the sum of the layers' page sizes, allocates each layer's cache from
its spec, and passes the views to the model in one ForwardBatch, which the model runner builds
once per forward pass and every attention layer reads by its layer_index. So a model with a new
kind of cache adds a spec and a layer, and nothing in the engine or the model signatures changes.

The Attention layer writes this step's keys and values into its cache, then attends over
everything cached; with a rotary embedding it rotates q and k on the way, in the same kernel as
the cache write (the rotated key goes straight to its slot).

Shape letters: T tokens in the step, B sequences, N cache blocks, S block size, Hq / Hkv query /
KV heads, D head size, M blocks per sequence, L latent size, R rotary dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

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


class KVCache(NamedTuple):
    """A full-attention layer's paged cache."""

    key: torch.Tensor    # [N, S, Hkv, D]
    value: torch.Tensor  # [N, S, Hkv, D]


@dataclass
class ForwardBatch:
    """What every layer of one forward pass reads besides its input: the batch's paged-cache
    metadata and each attention layer's cache view (kv_caches[layer.layer_index])."""

    attn_metadata: AttentionMetadata
    kv_caches: Sequence[Any]  # per attention layer, in layer_index order: what its spec allocates


@dataclass(frozen=True)
class KVCacheSpec:
    """What one attention layer's cache holds per token, and how it is allocated."""

    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        raise NotImplementedError

    def page_size_bytes(self, block_size: int) -> int:
        """Bytes of one cache block of block_size tokens."""
        return block_size * self.bytes_per_token

    def allocate(self, num_blocks: int, block_size: int, device: torch.device) -> Any:
        """The layer's cache of num_blocks blocks. Attention reads only slots its sequences have
        written, but the padding rows of a CUDA graph's batch read slot 0 of block 0: zeroed on
        CUDA, so they compute finite values (on CPU the pages stay untouched until used)."""
        raise NotImplementedError

    def _element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @staticmethod
    def _new(device: torch.device):
        return torch.zeros if torch.device(device).type == "cuda" else torch.empty


@dataclass(frozen=True)
class FullAttentionSpec(KVCacheSpec):
    """K and V of num_kv_heads x head_size per token. A sliding-window or chunked layer caches
    the same (its spec records the window, which a block manager that frees blocks out of the
    window would read)."""

    num_kv_heads: int
    head_size: int
    sliding_window: int | None = None
    chunk_size: int | None = None

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_size * self._element_size()

    def allocate(self, num_blocks: int, block_size: int, device: torch.device) -> KVCache:
        cache = self._new(device)(2, num_blocks, block_size, self.num_kv_heads, self.head_size,
                                  dtype=self.dtype, device=device)  # [2, N, S, Hkv, D]
        return KVCache(cache[0], cache[1])


@dataclass(frozen=True)
class LatentAttentionSpec(KVCacheSpec):
    """Multi-head latent attention (DeepSeek's MLA): one row of latent_size (kv_lora_rank)
    normalised latent values followed by rope_dim rotated key values per token, shared by every
    head; the values are the row's first latent_size entries, so there is no separate V."""

    latent_size: int
    rope_dim: int

    @property
    def bytes_per_token(self) -> int:
        return (self.latent_size + self.rope_dim) * self._element_size()

    def allocate(self, num_blocks: int, block_size: int, device: torch.device) -> torch.Tensor:
        return self._new(device)(num_blocks, block_size, self.latent_size + self.rope_dim,
                                 dtype=self.dtype, device=device)  # [N, S, L + R]


class AttentionLayer(nn.Module):
    """A layer that owns a slice of the KV cache: kv_caches[layer_index] of every ForwardBatch.
    Models number their attention layers 0, 1, ... in forward order."""

    def __init__(self, layer_index: int):
        super().__init__()
        self.layer_index = layer_index

    def kv_cache_spec(self, dtype: torch.dtype) -> KVCacheSpec:
        raise NotImplementedError


class Attention(AttentionLayer):
    """softmax(q k^T * scale) v over the paged cache, causal, with grouped-query heads and an
    optional sliding window (Mistral) or local-chunk restriction (Llama 4). With rotary_emb, q and
    k are rotated by their positions first."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 layer_index: int, sliding_window: int | None = None,
                 chunk_size: int | None = None, rotary_emb: RotaryEmbedding | None = None):
        super().__init__(layer_index)
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

    def kv_cache_spec(self, dtype: torch.dtype) -> FullAttentionSpec:
        return FullAttentionSpec(dtype, self.num_kv_heads, self.head_size, self.sliding_window,
                                 self.chunk_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
                positions: torch.Tensor | None = None, q_norm_weight: torch.Tensor | None = None,
                k_norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6
                ) -> torch.Tensor:
        """q: [T, Hq * D]; k, v: [T, Hkv * D]; positions: [T] int64 (with rotary_emb)
        -> [T, Hq * D]. With q_norm_weight and k_norm_weight ([D]), each head of q and k is
        RMS-normalised first (Qwen3, Llama 4), in the same kernel as the rotation and the cache
        write. q is rotated (and normalised) in place; k is only read."""
        tokens = q.shape[0]
        key_cache, value_cache = batch.kv_caches[self.layer_index]
        meta = batch.attn_metadata
        if self.rotary_emb is not None:
            rope = self.rotary_emb
            ops.rotary_embedding_and_cache(positions, q, k, v, self.head_size, rope.cos_sin_cache,
                                           rope.is_neox, key_cache, value_cache, meta.slot_mapping,
                                           q_norm_weight, k_norm_weight, norm_eps)
        else:
            if q_norm_weight is not None:  # the norm lives in the rotary kernel
                raise ValueError("a q/k norm needs the layer's rotary embedding")
            ops.reshape_and_cache(k.view(tokens, self.num_kv_heads, self.head_size),
                                  v.view(tokens, self.num_kv_heads, self.head_size),
                                  key_cache, value_cache, meta.slot_mapping)
        out = ops.attention(q.view(tokens, self.num_heads, self.head_size), key_cache, value_cache,
                            meta.cu_seqlens_q, meta.seq_lens_k, meta.block_tables,
                            meta.max_seqlen_q, meta.max_seqlen_k, self.scale,
                            self.sliding_window, self.chunk_size)
        return out.view(tokens, self.num_heads * self.head_size)


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The model's attention layers in layer_index order; ValueError unless they are numbered
    0 .. L-1 without gaps or repeats."""
    layers = sorted((m for m in model.modules() if isinstance(m, AttentionLayer)),
                    key=lambda m: m.layer_index)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layers")
    indices = [m.layer_index for m in layers]
    if indices != list(range(len(layers))):
        raise ValueError(f"{type(model).__name__}'s attention layers are numbered {indices}, "
                         f"not 0..{len(layers) - 1}")
    return layers


def kv_cache_specs(model: nn.Module, dtype: torch.dtype) -> list[KVCacheSpec]:
    """Each attention layer's cache spec, in layer_index order (per rank under tensor
    parallelism: the layers are built with their rank's heads)."""
    return [layer.kv_cache_spec(dtype) for layer in attention_layers(model)]


def allocate_kv_caches(specs: Sequence[KVCacheSpec], num_blocks: int, block_size: int,
                       device: torch.device) -> list[Any]:
    """One cache per spec, each num_blocks blocks of block_size tokens."""
    return [spec.allocate(num_blocks, block_size, device) for spec in specs]
