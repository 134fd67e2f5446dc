"""The Llama architecture, for every checkpoint shaped like it: Llama 2/3/3.1 (llama3 rope scaling),
Mistral (with or without a sliding window), SmolLM2, deepseek-llm.

Decoder layer: x -> RMSNorm -> attention (+ residual) -> RMSNorm -> SwiGLU MLP (+ residual).
q, k and v come out of one fused matmul and gate and up out of another; q/k/v are views of the
fused output (the rotary + cache-write kernel takes strided rows), and each residual add is fused
into the following norm, so a decode step costs nine kernel calls per layer.
Hugging Face checkpoints keep the projections separate; `weight_mapping` says which fused
parameter and which shard each of them loads into (fastgen.loader.weights does the loading).

Shape letters: T tokens in the packed batch, B sequences, H hidden, I intermediate,
Hq / Hkv query / KV heads, D head size, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from fastgen.layers.activation import SiluAndMul
from fastgen.layers.attention import Attention, ForwardBatch
from fastgen.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from fastgen.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fastgen.layers.norm import RMSNorm
from fastgen.layers.rotary import rope_params_from_config
from fastgen.loader.weights import WeightMapping, WeightRule
from fastgen.models.base import ModelContext


class LlamaAttention(nn.Module):
    def __init__(self, config, context: ModelContext, layer_index: int):
        super().__init__()
        hidden = config.hidden_size
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_size = getattr(config, "head_dim", None) or hidden // num_heads
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(hidden, head_size, num_heads, num_kv_heads, bias,
                                          context.tp)
        self.o_proj = RowParallelLinear(num_heads * head_size, hidden, bias, context.tp)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        base, scaling = rope_params_from_config(config)
        rotary_emb = context.rotary.get(head_size, head_size, config.max_position_embeddings,
                                        base, scaling)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_size,
                              scale=head_size ** -0.5, layer_index=layer_index,
                              sliding_window=getattr(config, "sliding_window", None),
                              rotary_emb=rotary_emb)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """positions: [T]; x: [T, H] -> [T, H]"""
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)  # views
        out = self.attn(q, k, v, batch, positions)  # rotates q, k; [T, Hq D]
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x))"""

    def __init__(self, config, context: ModelContext):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"Llama MLP supports hidden_act 'silu', the config has {config.hidden_act!r}")
        hidden, inter = config.hidden_size, config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias, context.tp)
        self.down_proj = RowParallelLinear(inter, hidden, bias, context.tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]"""
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, H]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, context: ModelContext, layer_index: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, context, layer_index)
        self.mlp = LlamaMLP(config, context)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; x, residual: [T, H] (this layer's input is x + residual) -> (x, residual)
        for the next layer. residual is None for the first layer, whose input is x alone."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)  # residual += x; x = norm(residual)
        x = self.self_attn(positions, x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, context: ModelContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   context.tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, context, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> [T, H]"""
        x, residual = self.embed_tokens(input_ids), None  # [T, H]
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # Hugging Face projection -> (fused parameter, the shard it fills)
    weight_mapping = WeightMapping(
        rules=(WeightRule("q_proj", "qkv_proj", shard_id="q"),
               WeightRule("k_proj", "qkv_proj", shard_id="k"),
               WeightRule("v_proj", "qkv_proj", shard_id="v"),
               WeightRule("gate_proj", "gate_up_proj", shard_id=0),
               WeightRule("up_proj", "gate_up_proj", shard_id=1)),
        ignore=("rotary_emb.inv_freq",))

    def __init__(self, config, context: ModelContext | None = None):
        super().__init__()
        context = context or ModelContext.for_config(config)
        self.config = config
        self.model = LlamaModel(config, context)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, context.tp)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
            self.weight_mapping = self.weight_mapping.ignoring("lm_head.weight")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden states [T, H]"""
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] -> [B, V] float32"""
        return self.lm_head(hidden)
