"""Llama 4 (Scout, Maverick): the text model of Llama4ForCausalLM and of Llama4ForConditionalGeneration
(whose language_model.* tensors it loads, skipping the vision tower and projector).

What differs from the Llama decoder (transformers' modeling_llama4 is the reference):
- iRoPE: layers with no_rope_layers[i] == 1 rotate q and k with interleaved (GPT-J) pairs and
  llama3-scaled frequencies and attend within attention_chunk_size-token chunks (8192); the
  others (every 4th in Scout) have no rotary and attend to everything, their queries scaled by
  the temperature log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1.
- On rotary layers a weightless RMS norm over each head of q and k (use_qk_norm). transformers
  applies it after the rotation; it is applied before it here, which is the same map (a rotation
  of each pair keeps the head's sum of squares, so the norm's scale is unchanged), and lets the
  norm, the rotation and the cache write be one kernel.
- Feed-forward: on the MoE layers (config.moe_layers) the router's top-k on raw logits, scored
  by sigmoid and not renormalised, scales each expert's INPUT (expert(s * x)), plus a shared
  expert on x; dense SwiGLU of intermediate_size_mlp elsewhere. Checkpoints store the experts
  fused and transposed (experts.gate_up_proj [E, H, 2I], experts.down_proj [E, I, H], no .weight
  suffix); re-saved checkpoints with per-expert names load too.

Shape letters: T tokens, H hidden, Hq / Hkv query / KV heads, D head size, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from fastgen.layers.attention import Attention, ForwardBatch
from fastgen.layers.linear import QKVParallelLinear, RowParallelLinear
from fastgen.layers.mlp import GatedMLP
from fastgen.layers.moe import MoERouting, SparseMoEBlock
from fastgen.layers.rotary import rope_params_from_config
from fastgen.loader.weights import WeightMapping, WeightRule
from fastgen.models.base import ModelContext
from fastgen.models.llama import LLAMA_RULES, DecoderLayer, LlamaForCausalLM, head_size_of


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """Llama 4's x @ W expert layout [E, in, out] -> nn.Linear's [E, out, in]."""
    return weight.transpose(1, 2)


class Llama4Attention(nn.Module):
    def __init__(self, config, context: ModelContext, layer_index: int):
        super().__init__()
        hidden = config.hidden_size
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_size = head_size = head_size_of(config)
        bias = bool(config.attention_bias)
        self.qkv_proj = QKVParallelLinear(hidden, head_size, num_heads, num_kv_heads, bias,
                                          context.tp)
        self.o_proj = RowParallelLinear(num_heads * head_size, hidden, bias, context.tp)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        use_rope = bool(config.no_rope_layers[layer_index])
        self.qk_norm = use_rope and bool(config.use_qk_norm)
        self.eps = config.rms_norm_eps
        if self.qk_norm:  # the norm has no weight: ones, for the kernel
            self.register_buffer("unit_weight", torch.ones(head_size), persistent=False)  # [D]
        self.temperature_tuning = not use_rope and bool(config.attn_temperature_tuning)
        self.floor_scale, self.attn_scale = float(config.floor_scale), float(config.attn_scale)
        rotary_emb = None
        if use_rope:
            base, scaling = rope_params_from_config(config)
            rotary_emb = context.rotary.get(head_size, head_size, config.max_position_embeddings,
                                            base, scaling, is_neox=False)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_size,
                              scale=head_size ** -0.5, layer_index=layer_index,
                              chunk_size=config.attention_chunk_size if use_rope else None,
                              rotary_emb=rotary_emb)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """positions: [T]; x: [T, H] -> [T, H]"""
        tokens, d = x.shape[0], self.head_size
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:  # per head, in the rotary kernel
            out = self.attn(q, k, v, batch, positions, self.unit_weight, self.unit_weight,
                            self.eps)
            return self.o_proj(out)
        if self.temperature_tuning:
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale))
            scale = scale * self.attn_scale + 1.0  # [T]
            q = (q.view(tokens, -1, d) * scale[:, None, None]).to(q.dtype).view(tokens, -1)
        return self.o_proj(self.attn(q, k, v, batch, positions))


class Llama4ForCausalLM(LlamaForCausalLM):
    weight_mapping = WeightMapping(
        rules=(WeightRule("language_model.model", "model"),     # Llama4ForConditionalGeneration
               WeightRule("language_model.lm_head", "lm_head"),
               WeightRule("feed_forward", "mlp"),
               WeightRule("router", "gate"),
               WeightRule("experts.gate_up_proj", "experts.w13", transform=_transposed),
               WeightRule("experts.down_proj", "experts.w2", transform=_transposed),
               WeightRule("experts.{e}.gate_proj.weight", "experts.w13", shard_id=0),
               WeightRule("experts.{e}.up_proj.weight", "experts.w13", shard_id=1),
               WeightRule("experts.{e}.down_proj.weight", "experts.w2"),
               *LLAMA_RULES),
        ignore=("rotary_emb.inv_freq", "vision_model", "multi_modal_projector"))

    def decoder_layer(self, config, context: ModelContext, layer_index: int) -> nn.Module:
        if layer_index in config.moe_layers:
            routing = MoERouting(config.num_experts_per_tok, "sigmoid", weight_on_input=True)
            mlp = SparseMoEBlock(config.hidden_size, config.num_local_experts,
                                 config.intermediate_size, routing,
                                 shared_intermediate_size=config.intermediate_size, tp=context.tp)
        else:
            mlp = GatedMLP(config.hidden_size, config.intermediate_size_mlp, tp=context.tp,
                           hidden_act=config.hidden_act)
        return DecoderLayer(config, Llama4Attention(config, context, layer_index), mlp)
