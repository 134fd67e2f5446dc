"""DeepSeek-V2 / V2-Lite / V3 against Hugging Face's on tiny random checkpoints: multi-head latent
attention over the latent cache (W_UK / W_UV absorbed), yarn rotary that bites (factor 40, mscale
set: the softmax scale moves too), and DeepSeekMoE routing in each variant — V2-Lite-shaped (no q
LoRA, greedy softmax top-k, two shared experts, a dense first layer), V2-shaped (q LoRA,
group-limited greedy, routed scale 16) and V3-shaped (sigmoid scores with a correction bias in the
selection, groups ranked by their best two, renormalised, scale 2.5, q LoRA). Packed prefill and
batched decode logits and greedy tokens (tests/models/harness.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from fastgen import LLM
from fastgen.layers.attention import LatentAttentionSpec, kv_cache_specs
from transformers import DeepseekV2Config, DeepseekV3Config

from tests.models.harness import VOCAB, assert_matches_hugging_face, save_tiny_model

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
        "mscale_all_dim": 0.707, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=12, n_shared_experts=2, first_k_dense_replace=1,
              max_position_embeddings=640, rope_parameters=YARN, tie_word_embeddings=False)
CASES = {
    "v2_lite": DeepseekV2Config(**COMMON, num_hidden_layers=3, q_lora_rank=None,
                                n_routed_experts=8, num_experts_per_tok=3, topk_method="greedy",
                                n_group=1, topk_group=1, norm_topk_prob=False,
                                routed_scaling_factor=1.0),
    "v2": DeepseekV2Config(**COMMON, num_hidden_layers=2, q_lora_rank=24, n_routed_experts=8,
                           num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=4,
                           topk_group=2, norm_topk_prob=False, routed_scaling_factor=16.0),
    "v3": DeepseekV3Config(**COMMON, num_hidden_layers=3, q_lora_rank=24, n_routed_experts=8,
                           num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True,
                           routed_scaling_factor=2.5),
}
LENGTHS = [13, 1, 29, 2]


def randomize_correction_bias(model) -> None:
    """transformers initialises V3's e_score_correction_bias to zeros: make it change choices."""
    g = torch.Generator().manual_seed(0)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hugging_face(case, tmp_path, device):
    assert_matches_hugging_face(CASES[case], tmp_path, device, LENGTHS,
                                prepare=randomize_correction_bias)


def test_latent_cache_bytes_per_token(tmp_path):
    """One [kv_lora_rank + qk_rope_head_dim] row per token and layer: the latent cache's whole
    point (V2-Lite: 27 x 576 x 2 = 31,104 bytes per token in bf16)."""
    config = CASES["v2_lite"]
    save_tiny_model(config, tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", device="cpu", cpu_kv_cache_gib=0.01)
    specs = kv_cache_specs(llm.engine.model_runner.model, torch.bfloat16)
    assert all(isinstance(spec, LatentAttentionSpec) for spec in specs)
    assert llm.engine.kv_cache_bytes_per_token == config.num_hidden_layers * (32 + 8) * 2
    assert llm.engine.kv_cache_capacity_tokens * llm.engine.kv_cache_bytes_per_token <= 0.01 * 2**30


def test_v3_multi_token_prediction_layer_is_skipped(tmp_path, caplog):
    """DeepSeek-V3 checkpoints carry their MTP module as layer num_hidden_layers: loaded past
    with one info line, not refused as unexpected tensors."""
    import logging

    from safetensors.torch import load_file, save_file

    config = copy.deepcopy(CASES["v3"])
    config.num_nextn_predict_layers = 1
    save_tiny_model(config, tmp_path, randomize_correction_bias)
    weights = load_file(tmp_path / "model.safetensors")
    extra = {name.replace("model.layers.2.", "model.layers.3."): t.clone()
             for name, t in weights.items() if name.startswith("model.layers.2.")}
    extra["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file({**weights, **extra}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO):
        llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_kv_cache_gib=0.01)
    assert len(llm.engine.model_runner.kv_cache_specs) == config.num_hidden_layers
    assert any("model.layers.3" in record.getMessage() for record in caplog.records)
