"""Qwen3 (dense): the Llama decoder with an RMSNorm (with weight) over each head of q and k before
rotary, an explicit head_dim (128 for Qwen3-8B, where hidden / heads is also 128, but not for
every size), and the config's attention_bias on all four projections."""

from __future__ import annotations

from torch import nn

from fastgen.models.base import ModelContext
from fastgen.models.llama import (DecoderLayer, LlamaAttention, LlamaForCausalLM, llama_mlp,
                                  sliding_window_of)


def qwen3_attention(config, context: ModelContext, layer_index: int) -> LlamaAttention:
    return LlamaAttention(config, context, layer_index, qk_norm=True,
                          sliding_window=sliding_window_of(config, layer_index))


class Qwen3ForCausalLM(LlamaForCausalLM):
    def decoder_layer(self, config, context: ModelContext, layer_index: int) -> nn.Module:
        return DecoderLayer(config, qwen3_attention(config, context, layer_index),
                            llama_mlp(config, context))
