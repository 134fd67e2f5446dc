"""Qwen2 and Qwen2.5 (dense): the Llama decoder with biases on q, k and v (none on o) and, where
the config's layer_types say so, sliding-window layers."""

from __future__ import annotations

from torch import nn

from fastgen.models.base import ModelContext
from fastgen.models.llama import (DecoderLayer, LlamaAttention, LlamaForCausalLM, llama_mlp,
                                  sliding_window_of)


class Qwen2ForCausalLM(LlamaForCausalLM):
    def decoder_layer(self, config, context: ModelContext, layer_index: int) -> nn.Module:
        attention = LlamaAttention(config, context, layer_index, qkv_bias=True, o_bias=False,
                                   sliding_window=sliding_window_of(config, layer_index))
        return DecoderLayer(config, attention, llama_mlp(config, context))
