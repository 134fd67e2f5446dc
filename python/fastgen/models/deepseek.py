"""DeepSeek-V2 / V2-Lite and DeepSeek-V3 / R1: the Llama decoder with multi-head latent attention
(fastgen.layers.mla: a latent cache of kv_lora_rank + qk_rope_head_dim values per token, the key
and value up-projections absorbed) and DeepSeekMoE feed-forward layers.

What differs from the Llama decoder (transformers' modeling_deepseek_v2 / _v3 are the reference):
- Attention: q from q_proj, or through a low-rank q_a_proj -> q_a_layernorm -> q_b_proj when
  q_lora_rank is set (V2, V3); kv_a_proj_with_mqa gives the latent (normalised by
  kv_a_layernorm) and one rotary key shared by all heads; kv_b_proj [H * (P + V), L] holds each
  head's W_UK and W_UV, split once after loading. Rotary (yarn from the config) on the last
  qk_rope_head_dim of each head: GPT-J pairs (V2; V3 with rope_interleave, its default), else
  rotate-half. Softmax scale qk_head_dim^-0.5 * mscale^2 with yarn's mscale_all_dim.
  config.head_dim is transformers' rotary size (qk_rope_head_dim), not the attention head size.
- Feed-forward: dense SwiGLU on the first first_k_dense_replace layers, DeepSeekMoE after:
  routed experts plus one shared MLP of moe_intermediate_size * n_shared_experts. V2 routes by
  softmax, greedy or group-limited (n_group groups ranked by their best score, topk_group
  kept), weights times routed_scaling_factor, renormalised only when top_k > 1 and
  norm_topk_prob (the original code; transformers 5 never renormalises, and V2 / V2-Lite ship
  norm_topk_prob false). V3 routes by sigmoid, selecting with e_score_correction_bias added
  (selection only) among the topk_group of n_group groups ranked by their two best scores
  ("noaux_tc"), renormalised when norm_topk_prob, times routed_scaling_factor.
- The router's weight and logits are float32 in every dtype, as transformers keeps them.
- V3's multi-token-prediction layer (model.layers.{num_hidden_layers}, as DeepSeek ships it) is
  not used for generation; its tensors are skipped with one info line.

Shape letters: T tokens, H heads, P qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim,
L kv_lora_rank.
"""

from __future__ import annotations

import torch
from torch import nn

from fastgen.layers.attention import ForwardBatch
from fastgen.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from fastgen.layers.mla import LatentAttention
from fastgen.layers.mlp import GatedMLP
from fastgen.layers.moe import MoERouting, SparseMoEBlock
from fastgen.layers.norm import RMSNorm
from fastgen.layers.rotary import rope_params_from_config, yarn_mscale
from fastgen.loader.weights import WeightMapping, WeightRule
from fastgen.models.base import ModelContext
from fastgen.models.llama import DecoderLayer, LlamaForCausalLM
from fastgen.models.qwen_moe import QWEN_EXPERT_RULES

# q_a_layernorm's and kv_a_layernorm's epsilon: transformers' default, not the config's
LATENT_NORM_EPS = 1e-6


def softmax_scale(config) -> float:
    """qk_head_dim^-0.5, times yarn's mscale(factor, mscale_all_dim)^2 when the rotary is scaled."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    _, scaling = rope_params_from_config(config)
    if scaling and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    return scale


class DeepseekAttention(nn.Module):
    """The projections around LatentAttention, under the checkpoint's names."""

    def __init__(self, config, context: ModelContext, layer_index: int, is_neox: bool):
        super().__init__()
        hidden, heads, tp = config.hidden_size, config.num_attention_heads, context.tp
        nope, rope, v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        latent = config.kv_lora_rank
        bias = bool(getattr(config, "attention_bias", False))
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * (nope + rope), False, tp)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias, tp)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * (nope + rope), False, tp)
        # The latent and the rotary key are every head's: replicated under tensor parallelism.
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, latent + rope, bias, tp)
        self.kv_a_layernorm = RMSNorm(latent, LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(latent, heads * (nope + v_dim), False, tp)
        self.o_proj = RowParallelLinear(heads * v_dim, hidden, bias, tp)
        self.num_heads = heads // tp.size
        self.nope_dim, self.v_head_dim, self.latent_size = nope, v_dim, latent
        base, scaling = rope_params_from_config(config)
        rotary_emb = context.rotary.get(rope, rope, config.max_position_embeddings, base, scaling,
                                        is_neox=is_neox)
        self.attn = LatentAttention(self.num_heads, nope, rope, v_dim, latent,
                                    softmax_scale(config), layer_index, rotary_emb)
        self.register_buffer("w_uk", torch.empty(0), persistent=False)    # [H, P, L]
        self.register_buffer("w_uv_t", torch.empty(0), persistent=False)  # [H, L, V]

    def process_weights_after_loading(self) -> None:
        """W_UK and W_UV (transposed) split out of kv_b_proj, each head's [P + V, L] rows."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_head_dim,
                                       self.latent_size)
        self.w_uk = w[:, :self.nope_dim].contiguous()
        self.w_uv_t = w[:, self.nope_dim:].transpose(1, 2).contiguous()

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """positions: [T]; x: [T, hidden] -> [T, hidden]"""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [T, H * (P + R)]
        kv_a = self.kv_a_proj_with_mqa(x)  # [T, L + R]
        out = self.attn(q, kv_a, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps,
                        self.w_uk, self.w_uv_t, positions, batch)
        return self.o_proj(out)


DEEPSEEK_RULES = (
    *QWEN_EXPERT_RULES,
    WeightRule("shared_experts", "shared_expert"),
    WeightRule("gate.e_score_correction_bias", "experts.e_score_correction_bias"),
    WeightRule("gate_proj", "gate_up_proj", shard_id=0),
    WeightRule("up_proj", "gate_up_proj", shard_id=1),
)


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    weight_mapping = WeightMapping(rules=DEEPSEEK_RULES, ignore=("rotary_emb.inv_freq",))

    def __init__(self, config, context: ModelContext | None = None):
        super().__init__(config, context)
        # DeepSeek-V3 ships its multi-token-prediction module as one more decoder layer.
        extra = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
        if extra:
            layers = range(config.num_hidden_layers, config.num_hidden_layers + extra)
            self.weight_mapping = self.weight_mapping.ignoring(
                *(f"model.layers.{i}" for i in layers))

    def routing(self, config) -> MoERouting:
        groups = config.n_group if config.topk_method == "group_limited_greedy" else None
        return MoERouting(config.num_experts_per_tok, "softmax",
                          renormalize=(config.num_experts_per_tok > 1
                                       and bool(config.norm_topk_prob)),
                          num_groups=groups, topk_groups=config.topk_group if groups else None,
                          scale=float(config.routed_scaling_factor))

    def rope_is_neox(self, config) -> bool:
        return False

    def decoder_layer(self, config, context: ModelContext, layer_index: int) -> nn.Module:
        attention = DeepseekAttention(config, context, layer_index, self.rope_is_neox(config))
        if layer_index < config.first_k_dense_replace:
            mlp = GatedMLP(config.hidden_size, config.intermediate_size, tp=context.tp,
                           hidden_act=config.hidden_act)
        else:
            routing = self.routing(config)
            mlp = SparseMoEBlock(
                config.hidden_size, config.n_routed_experts, config.moe_intermediate_size,
                routing, config.moe_intermediate_size * config.n_shared_experts, tp=context.tp,
                correction_bias=routing.scoring == "sigmoid", router_fp32=True)
        return DecoderLayer(config, attention, mlp)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    def routing(self, config) -> MoERouting:
        return MoERouting(config.num_experts_per_tok, "sigmoid",
                          renormalize=bool(config.norm_topk_prob), num_groups=config.n_group,
                          topk_groups=config.topk_group, group_scoring="sum_top2",
                          scale=float(config.routed_scaling_factor))

    def rope_is_neox(self, config) -> bool:
        return not getattr(config, "rope_interleave", True)
