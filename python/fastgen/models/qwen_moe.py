"""Qwen2-MoE (Qwen1.5-MoE) and Qwen3-MoE: the Qwen2 / Qwen3 decoder whose feed-forward is a
mixture of experts on the layers the config says (not in mlp_only_layers, and every
decoder_sparse_step-th), a dense SwiGLU MLP on the others. Routing: softmax over the experts,
top k, renormalised only when norm_topk_prob. Qwen2-MoE adds one shared expert to every MoE layer,
scaled by sigmoid(shared_expert_gate(x)); Qwen3-MoE has none, and Qwen3's per-head q/k norms."""

from __future__ import annotations

from torch import nn

from fastgen.layers.mlp import GatedMLP
from fastgen.layers.moe import MoERouting, SparseMoEBlock
from fastgen.loader.weights import WeightMapping, WeightRule
from fastgen.models.base import ModelContext
from fastgen.models.llama import (LLAMA_RULES, DecoderLayer, LlamaAttention, LlamaForCausalLM,
                                  sliding_window_of)
from fastgen.models.qwen3 import qwen3_attention

QWEN_EXPERT_RULES = (
    WeightRule("experts.{e}.gate_proj.weight", "experts.w13", shard_id=0),
    WeightRule("experts.{e}.up_proj.weight", "experts.w13", shard_id=1),
    WeightRule("experts.{e}.down_proj.weight", "experts.w2"),
)


def is_moe_layer(config, layer_index: int) -> bool:
    """transformers' rule for Qwen2-MoE and Qwen3-MoE."""
    return (layer_index not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_index + 1) % config.decoder_sparse_step == 0)


def qwen_feed_forward(config, context: ModelContext, layer_index: int,
                      shared_expert: bool) -> nn.Module:
    if not is_moe_layer(config, layer_index):
        return GatedMLP(config.hidden_size, config.intermediate_size, tp=context.tp,
                        hidden_act=config.hidden_act)
    routing = MoERouting(config.num_experts_per_tok, "softmax",
                         renormalize=bool(config.norm_topk_prob))
    shared = config.shared_expert_intermediate_size if shared_expert else None
    return SparseMoEBlock(config.hidden_size, config.num_experts, config.moe_intermediate_size,
                          routing, shared_intermediate_size=shared,
                          shared_expert_gate=shared_expert, tp=context.tp)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    weight_mapping = WeightMapping(rules=(*QWEN_EXPERT_RULES, *LLAMA_RULES),
                                   ignore=("rotary_emb.inv_freq",))

    def decoder_layer(self, config, context: ModelContext, layer_index: int) -> nn.Module:
        attention = LlamaAttention(config, context, layer_index,
                                   qkv_bias=bool(config.qkv_bias), o_bias=False,
                                   sliding_window=sliding_window_of(config, layer_index))
        return DecoderLayer(config, attention,
                            qwen_feed_forward(config, context, layer_index, shared_expert=True))


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    weight_mapping = Qwen2MoeForCausalLM.weight_mapping

    def decoder_layer(self, config, context: ModelContext, layer_index: int) -> nn.Module:
        return DecoderLayer(config, qwen3_attention(config, context, layer_index),
                            qwen_feed_forward(config, context, layer_index, shared_expert=False))
