"""fastgen's Qwen2 and Qwen3 (dense) against Hugging Face's on tiny random checkpoints: q/k/v
biases (Qwen2), per-head q/k RMSNorms with weights and a head_dim that is not hidden / heads
(Qwen3), and sliding-window layers from layer_types; packed prefill and batched decode logits and
greedy tokens (tests/models/harness.py)."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config, Qwen3Config

from tests.models.harness import assert_matches_hugging_face

CASES = {
    # biases on q, k, v; layers 1 and 2 slide over 7 tokens (max_window_layers 1)
    "qwen2": Qwen2Config(hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=7, max_window_layers=1, tie_word_embeddings=True),
    # head_dim 48 while hidden / heads = 32; q/k norms; attention_bias on all four projections
    "qwen3": Qwen3Config(hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=48,
                         attention_bias=True, tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hugging_face(case, tmp_path, device):
    assert_matches_hugging_face(CASES[case], tmp_path, device)
