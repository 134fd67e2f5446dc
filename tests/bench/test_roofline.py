"""The roofline benchmarks' cost model on a mixture of experts: a decode step reads the dense
weights and the share of experts its tokens reach, and multiplies k experts' weights per token."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig

from bench.e2e.roofline import StepCost
from fastgen.models.mixtral import MixtralForCausalLM


def test_moe_step_cost_counts_only_the_experts_read():
    h, i, e, k, layers, v = 64, 48, 8, 2, 3, 100
    config = MixtralConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=e,
                           num_experts_per_tok=k, vocab_size=v, tie_word_embeddings=False)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    cost = StepCost.of(model, config)
    per_expert = 3 * h * i  # gate, up, down
    assert (cost.experts, cost.experts_per_token) == (e, k)
    assert cost.expert_bytes == layers * e * per_expert * 4  # float32
    assert cost.experts_read(1) == pytest.approx(k / e)
    assert cost.experts_read(64) == pytest.approx(1 - (1 - k / e) ** 64)
    dense = layers * (h * 16 * 4 + 2 * h * 16 * 2 + h * 16 * 4 + h * e) + v * h  # attn, router, head
    assert cost.matmul_weights == dense + layers * k * per_expert
    assert cost.bytes(1, 0) == pytest.approx(cost.weight_bytes + cost.expert_bytes * k / e
                                             + cost.row_bytes)


def test_mla_step_cost_counts_latent_rows():
    """A DeepSeek key is one [kv_lora_rank + rope] row per layer, read by every head."""
    from transformers import DeepseekV2Config

    from fastgen.models.deepseek import DeepseekV2ForCausalLM

    config = DeepseekV2Config(hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                              q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                              qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                              num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                              vocab_size=100, tie_word_embeddings=False)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    cost = StepCost.of(model, config)
    assert cost.kv_bytes_per_key == 3 * (32 + 8) * 4
    assert cost.flops_per_key == 2 * 3 * 4 * (2 * 32 + 8)
    assert (cost.experts, cost.experts_per_token) == (8, 2)
