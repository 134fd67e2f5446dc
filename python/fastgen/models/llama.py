"""The Llama architecture, for every checkpoint shaped like it: Llama 2/3/3.1 (llama3 rope scaling),
Mistral (with or without a sliding window), SmolLM2, deepseek-llm — and the decoder the Qwen and
Mixtral families reuse (their files say only how they differ: biases, q/k norms, which layers
are mixtures of experts, and their checkpoint names).

Decoder layer: x -> RMSNorm -> attention (+ residual) -> RMSNorm -> feed-forward (+ residual).
q, k and v come out of one fused matmul and gate and up out of another; q/k/v are views of the
fused output (the rotary + cache-write kernel takes strided rows), and each residual add is fused
into the following norm, so a Llama decode step costs nine kernel calls per layer (Qwen3's
per-head q/k norm runs inside the rotary kernel and adds none).
Hugging Face checkpoints keep the projections separate; `weight_mapping` says which fused
parameter and which shard each of them loads into (fastgen.loader.weights does the loading).

Shape letters: T tokens in the packed batch, B sequences, H hidden, I intermediate,
Hq / Hkv query / KV heads, D head size, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from fastgen.layers.attention import Attention, ForwardBatch
from fastgen.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from fastgen.layers.linear import QKVParallelLinear, RowParallelLinear
from fastgen.layers.mlp import GatedMLP
from fastgen.layers.norm import RMSNorm
from fastgen.layers.rotary import rope_params_from_config
from fastgen.loader.weights import WeightMapping, WeightRule
from fastgen.models.base import ModelContext

LLAMA_RULES = (  # Hugging Face projection -> (fused parameter, the shard it fills)
    WeightRule("q_proj", "qkv_proj", shard_id="q"),
    WeightRule("k_proj", "qkv_proj", shard_id="k"),
    WeightRule("v_proj", "qkv_proj", shard_id="v"),
    WeightRule("gate_proj", "gate_up_proj", shard_id=0),
    WeightRule("up_proj", "gate_up_proj", shard_id=1),
)


def head_size_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config, layer_index: int) -> int | None:
    """A layer's attention window: by the config's layer_types where it has them (Qwen2/3:
    "sliding_attention" layers), else the config's sliding_window for every layer (Mistral)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_index] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


class LlamaAttention(nn.Module):
    """qkv_bias / o_bias: default the config's attention_bias; qk_norm: an RMSNorm with weight
    over each head of q and k before rotary (Qwen3); sliding_window: this layer's window (None:
    attends to everything before it)."""

    def __init__(self, config, context: ModelContext, layer_index: int, *,
                 qkv_bias: bool | None = None, o_bias: bool | None = None, qk_norm: bool = False,
                 sliding_window: int | None = None):
        super().__init__()
        hidden = config.hidden_size
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_size = head_size = head_size_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(hidden, head_size, num_heads, num_kv_heads,
                                          bias if qkv_bias is None else qkv_bias, context.tp)
        self.o_proj = RowParallelLinear(num_heads * head_size, hidden,
                                        bias if o_bias is None else o_bias, context.tp)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.q_norm = RMSNorm(head_size, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_size, config.rms_norm_eps) if qk_norm else None
        base, scaling = rope_params_from_config(config)
        rotary_emb = context.rotary.get(head_size, head_size, config.max_position_embeddings,
                                        base, scaling)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_size,
                              scale=head_size ** -0.5, layer_index=layer_index,
                              sliding_window=sliding_window, rotary_emb=rotary_emb)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """positions: [T]; x: [T, H] -> [T, H]"""
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)  # views
        if self.q_norm is None:
            out = self.attn(q, k, v, batch, positions)  # rotates q, k; [T, Hq D]
        else:  # per-head norms in the rotary kernel
            out = self.attn(q, k, v, batch, positions, self.q_norm.weight, self.k_norm.weight,
                            self.q_norm.eps)
        return self.o_proj(out)


def llama_mlp(config, context: ModelContext) -> GatedMLP:
    return GatedMLP(config.hidden_size, config.intermediate_size,
                    bool(getattr(config, "mlp_bias", False)), context.tp, config.hidden_act)


class DecoderLayer(nn.Module):
    """Pre-norm attention and feed-forward blocks with their residuals."""

    def __init__(self, config, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
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
    def __init__(self, config, layers: list[nn.Module], context: ModelContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   context.tp)
        self.layers = nn.ModuleList(layers)
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
    """The model; a family that shares the decoder overrides decoder_layer and weight_mapping."""

    weight_mapping = WeightMapping(rules=LLAMA_RULES, ignore=("rotary_emb.inv_freq",))

    def __init__(self, config, context: ModelContext | None = None):
        super().__init__()
        context = context or ModelContext.for_config(config)
        self.config = config
        layers = [self.decoder_layer(config, context, i) for i in range(config.num_hidden_layers)]
        self.model = LlamaModel(config, layers, context)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, context.tp)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
            self.weight_mapping = self.weight_mapping.ignoring("lm_head.weight")

    def decoder_layer(self, config, context: ModelContext, layer_index: int) -> nn.Module:
        attention = LlamaAttention(config, context, layer_index,
                                   sliding_window=sliding_window_of(config, layer_index))
        return DecoderLayer(config, attention, llama_mlp(config, context))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden states [T, H]"""
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] -> [B, V] float32"""
        return self.lm_head(hidden)
