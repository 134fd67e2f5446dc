"""The KV cache as the layers describe it: the engine sizes the number of blocks from the sum of
every attention layer's page size and allocates each layer's cache from its own spec, here for a
model with a full-attention layer beside a latent (MLA-shaped) one, whose caches differ in shape
and cost per token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgen.config import CacheConfig, EngineConfig
from fastgen.engine.model_runner import ModelRunner
from fastgen.layers.attention import (Attention, AttentionLayer, FullAttentionSpec, KVCache,
                                      LatentAttentionSpec, attention_layers)

BLOCK_SIZE = 16
LATENT, ROPE = 40, 8


class LatentLayer(AttentionLayer):
    def kv_cache_spec(self, dtype):
        return LatentAttentionSpec(dtype, LATENT, ROPE)


class TwoKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))  # fixes device and dtype
        self.latent = LatentLayer(layer_index=1)
        self.full = Attention(6, 2, 32, scale=1.0, layer_index=0, sliding_window=64)


def test_cache_is_sized_and_allocated_from_each_layers_spec():
    model = TwoKinds()
    assert [type(layer) for layer in attention_layers(model)] == [Attention, LatentLayer]
    gib = 0.01
    runner = ModelRunner(model, EngineConfig(cache=CacheConfig(block_size=BLOCK_SIZE,
                                                               cpu_kv_cache_gib=gib)),
                         max_model_len=512)
    full, latent = runner.kv_cache_specs
    assert full == FullAttentionSpec(torch.bfloat16, 2, 32, sliding_window=64)
    assert full.bytes_per_token == 2 * 2 * 32 * 2 and latent.bytes_per_token == (LATENT + ROPE) * 2
    assert runner.bytes_per_token == full.bytes_per_token + latent.bytes_per_token
    page = full.page_size_bytes(BLOCK_SIZE) + latent.page_size_bytes(BLOCK_SIZE)
    assert page == BLOCK_SIZE * runner.bytes_per_token
    assert runner.num_blocks == int(gib * 2**30) // page
    keys, values = runner.kv_caches[0]
    assert isinstance(runner.kv_caches[0], KVCache)
    assert keys.shape == values.shape == (runner.num_blocks, BLOCK_SIZE, 2, 32)
    assert runner.kv_caches[1].shape == (runner.num_blocks, BLOCK_SIZE, LATENT + ROPE)
    assert all(t.dtype == torch.bfloat16 for t in (keys, values, runner.kv_caches[1]))


def test_layers_must_be_numbered_in_order():
    model = TwoKinds()
    model.latent.layer_index = 2
    with pytest.raises(ValueError, match=r"numbered \[0, 2\], not 0..1"):
        attention_layers(model)
