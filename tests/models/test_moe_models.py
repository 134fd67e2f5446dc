"""fastgen's mixture-of-experts families against Hugging Face's on tiny random checkpoints
(transformers builds every one from a config; save_pretrained writes the real on-disk expert
names): Mixtral (top-2 renormalised, a sliding window), Qwen2-MoE (a shared expert behind a
sigmoid gate, no renormalisation, q/k/v biases) and Qwen3-MoE (renormalised, q/k norms, head_dim
!= hidden / heads, a dense layer beside the MoE ones via mlp_only_layers). More experts than a
short prompt's tokens reach, so some experts get no token. Packed prefill and batched decode
logits and greedy tokens (tests/models/harness.py)."""

from __future__ import annotations

import pytest
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from tests.models.harness import assert_matches_hugging_face

CASES = {
    "mixtral": MixtralConfig(hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                             num_experts_per_tok=2, sliding_window=9,
                             tie_word_embeddings=False),
    "qwen2_moe": Qwen2MoeConfig(hidden_size=64, intermediate_size=48, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_experts=10,
                                num_experts_per_tok=3, norm_topk_prob=False,
                                tie_word_embeddings=False),
    "qwen3_moe": Qwen3MoeConfig(hidden_size=64, intermediate_size=48, moe_intermediate_size=24,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=32, num_experts=8, num_experts_per_tok=2,
                                norm_topk_prob=True, mlp_only_layers=[0],
                                tie_word_embeddings=False),
}
LENGTHS = [13, 1, 29, 2]  # a one-token prompt: most experts of that row's step get no token


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hugging_face(case, tmp_path, device):
    assert_matches_hugging_face(CASES[case], tmp_path, device, LENGTHS)
