"""Mixtral: the Llama decoder (with the config's optional sliding window) whose feed-forward is a
mixture of experts in every layer: softmax over the experts' router logits, the top k (2),
always renormalised, each expert's output weighted.

Checkpoints name the block block_sparse_moe and the experts' projections w1 (gate), w3 (up) and
w2 (down); the mapping renames them onto SparseMoEBlock's fused experts."""

from __future__ import annotations

from torch import nn

from fastgen.layers.moe import MoERouting, SparseMoEBlock
from fastgen.loader.weights import WeightMapping, WeightRule
from fastgen.models.base import ModelContext
from fastgen.models.llama import LLAMA_RULES, DecoderLayer, LlamaAttention, LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    weight_mapping = WeightMapping(
        rules=(WeightRule("block_sparse_moe", "mlp"),
               WeightRule("experts.{e}.w1.weight", "experts.w13", shard_id=0),
               WeightRule("experts.{e}.w3.weight", "experts.w13", shard_id=1),
               WeightRule("experts.{e}.w2.weight", "experts.w2"),
               *LLAMA_RULES),
        ignore=("rotary_emb.inv_freq",))

    def decoder_layer(self, config, context: ModelContext, layer_index: int) -> nn.Module:
        attention = LlamaAttention(config, context, layer_index,
                                   sliding_window=getattr(config, "sliding_window", None))
        routing = MoERouting(config.num_experts_per_tok, "softmax", renormalize=True)
        moe = SparseMoEBlock(config.hidden_size, config.num_local_experts,
                             config.intermediate_size, routing, tp=context.tp)
        return DecoderLayer(config, attention, moe)
