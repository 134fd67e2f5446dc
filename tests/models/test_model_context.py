"""What a model takes from its ModelContext: the rotary cos/sin tables are built once per set of
parameters and shared by every layer, with as many rows as the engine's max_model_len, not the
model's max_position_embeddings (Llama-3.1-8B's 131072 positions would otherwise cost 32 tables
of 64 MiB)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from fastgen.models.base import ModelContext
from fastgen.models.llama import LlamaForCausalLM

# Llama-3.1-8B's shapes (bench/e2e/presets.py), built on the meta device: no memory is used.
LLAMA31_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})


def buffer_bytes(model: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())  # each tensor once


def build(config, max_model_len=None) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(config, ModelContext.for_config(config, max_model_len))


def test_every_layer_shares_one_table_sized_to_max_model_len():
    model = build(LLAMA31_8B, max_model_len=8192)
    tables = {id(layer.self_attn.attn.rotary_emb) for layer in model.model.layers}
    assert len(tables) == 1
    (table,) = {layer.self_attn.attn.rotary_emb.cos_sin_cache for layer in model.model.layers}
    assert table.shape == (8192, 128) and table.dtype == torch.float32
    assert buffer_bytes(model) == 8192 * 128 * 4  # 4 MiB (2 GiB when each layer had its own)
    assert buffer_bytes(build(LLAMA31_8B)) == 131072 * 128 * 4  # the default: the model's length


def test_the_table_is_the_full_length_ones_prefix():
    """Sizing the table to max_model_len changes no value (YaRN's frequencies depend on the
    model's max_position_embeddings, which the table still reads)."""
    config = LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                          "factor": 4.0, "original_max_position_embeddings": 1024})
    short = LlamaForCausalLM(config, ModelContext.for_config(config, 300))
    full = LlamaForCausalLM(config)
    rope = lambda m: m.model.layers[0].self_attn.attn.rotary_emb.cos_sin_cache  # noqa: E731
    assert torch.equal(rope(short), rope(full)[:300])
