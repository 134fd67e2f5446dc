"""The Llama architecture, for every checkpoint shaped like it: Llama 2/3/3.1 (llama3 rope scaling),
Mistral (with or without a sliding window), SmolLM2, deepseek-llm.

Decoder layer: x -> RMSNorm -> attention (+ residual) -> RMSNorm -> SwiGLU MLP (+ residual).
q, k and v come out of one fused matmul and gate and up out of another; q/k/v are views of the
fused output (the rotary + cache-write kernel takes strided rows), and each residual add is fused
into the following norm, so a decode step costs nine kernel calls per layer.
Hugging Face checkpoints keep the projections separate; `packed_modules_mapping` says which fused
parameter and which shard each of them loads into.

Shape letters: T tokens in the packed batch, B sequences, H hidden, I intermediate,
Hq / Hkv query / KV heads, D head size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fastgen.layers.activation import SiluAndMul
from fastgen.layers.attention import Attention, AttentionMetadata, KVCache
from fastgen.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from fastgen.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fastgen.layers.norm import RMSNorm
from fastgen.layers.rotary import RotaryEmbedding, rope_params_from_config


class LlamaAttention(nn.Module):
    def __init__(self, config, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        hidden = config.hidden_size
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_size = getattr(config, "head_dim", None) or hidden // num_heads
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(hidden, head_size, num_heads, num_kv_heads, bias,
                                          tp_rank, tp_size)
        self.o_proj = RowParallelLinear(num_heads * head_size, hidden, bias, tp_rank, tp_size)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        base, scaling = rope_params_from_config(config)
        rotary_emb = RotaryEmbedding(head_size, head_size, config.max_position_embeddings, base,
                                     scaling)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_size,
                              scale=head_size ** -0.5,
                              sliding_window=getattr(config, "sliding_window", None),
                              rotary_emb=rotary_emb)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """positions: [T]; x: [T, H] -> [T, H]"""
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)  # views
        out = self.attn(q, k, v, kv_cache, meta, positions)  # rotates q, k; [T, Hq D]
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x))"""

    def __init__(self, config, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"Llama MLP supports hidden_act 'silu', the config has {config.hidden_act!r}")
        hidden, inter = config.hidden_size, config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(inter, hidden, bias, tp_rank, tp_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]"""
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, H]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.self_attn = LlamaAttention(config, tp_rank, tp_size)
        self.mlp = LlamaMLP(config, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: KVCache, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; x, residual: [T, H] (this layer's input is x + residual) -> (x, residual)
        for the next layer. residual is None for the first layer, whose input is x alone."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)  # residual += x; x = norm(residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   tp_rank, tp_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, tp_rank, tp_size)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> [T, H]"""
        x, residual = self.embed_tokens(input_ids), None  # [T, H]
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # Hugging Face projection name -> (fused parameter, shard it loads into)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp_rank, tp_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden states [T, H]"""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] -> [B, V] float32"""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies Hugging Face-named tensors into the (fused, sharded) parameters.
        Raises ValueError naming any tensor the model has no place for, any parameter left
        unloaded, and any shape mismatch."""
        params = dict(self.named_parameters())  # a tied head appears once, as embed_tokens
        expected = self._checkpoint_names(params)
        unexpected, loaded = [], set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            param_name, shard_id = name, None
            for hf_part, (fused, shard) in self.packed_modules_mapping.items():
                if f".{hf_part}." in name:
                    param_name, shard_id = name.replace(f".{hf_part}.", f".{fused}."), shard
                    break
            param = params.get(param_name)
            if param is None:
                unexpected.append(name)
                continue
            try:
                getattr(param, "weight_loader", _default_weight_loader)(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"weight {name}: {e}") from None
            loaded.add(name)
        missing = sorted(expected - loaded)
        if unexpected or missing:
            parts = []
            if unexpected:
                parts.append(f"unexpected weights: {', '.join(sorted(unexpected)[:8])}"
                             + (f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
            if missing:
                parts.append(f"missing weights: {', '.join(missing[:8])}"
                             + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""))
            raise ValueError("; ".join(parts))

    def _checkpoint_names(self, params: dict[str, nn.Parameter]) -> set[str]:
        """The Hugging Face names a complete checkpoint holds for these parameters."""
        unpacked: dict[str, list[str]] = {}
        for hf_part, (fused, _) in self.packed_modules_mapping.items():
            unpacked.setdefault(fused, []).append(hf_part)
        names = set()
        for name in params:
            module, _, leaf = name.rpartition(".")
            parent, _, last = module.rpartition(".")
            if last in unpacked:
                names.update(f"{parent}.{hf_part}.{leaf}" for hf_part in unpacked[last])
            else:
                names.add(name)
        return names


def _default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor,
                           shard_id: str | int | None = None) -> None:
    """A checked whole-tensor copy, for parameters whose layer has no sharding rule (norms)."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, "
                         f"the model expects {tuple(param.shape)}")
    param.data.copy_(loaded_weight)
