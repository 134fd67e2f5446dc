"""fastgen's Llama against Hugging Face's, on tiny random checkpoints written by save_pretrained and
read back by fastgen.loader: logits of a packed prefill of prompts of different lengths and of
batched decode steps fed with HF's greedy tokens must match HF's within the logit tolerance, and
the greedy tokens must be the same."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, MistralConfig

from fastgen.config import EngineConfig
from fastgen.loader import load_model
from tests.models.harness import (DEFAULT_PROMPT_LENGTHS, assert_matches_hugging_face,
                                  save_tiny_model)

CASES = {
    # 6 query heads share 2 KV heads; untied head
    "llama": LlamaConfig(hidden_size=192, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                         tie_word_embeddings=False),
    # Llama 3.1 scaling with a short original context, so prompts run well past it
    "llama3_rope_scaling": LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}),
    # a window shorter than every prompt; 5 heads, no grouping
    "mistral_sliding_window": MistralConfig(
        hidden_size=160, intermediate_size=288, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=5, head_dim=32, sliding_window=7, tie_word_embeddings=False),
    # biases everywhere, tied embeddings, head_dim * heads != hidden
    "llama_bias_tied": LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, head_dim=64,
                                   attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
}
PROMPT_LENGTHS = {"llama3_rope_scaling": [150, 97, 211]}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hugging_face(case, tmp_path, device):
    assert_matches_hugging_face(CASES[case], tmp_path, device,
                                PROMPT_LENGTHS.get(case, DEFAULT_PROMPT_LENGTHS))


def test_tied_head_shares_the_embedding(tmp_path):
    save_tiny_model(CASES["llama_bias_tied"], tmp_path)
    model = load_model(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu")).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
