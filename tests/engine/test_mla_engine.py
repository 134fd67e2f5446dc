"""The engine's paths on a DeepSeek-V2-Lite-shaped model, whose attention layers keep a latent
cache (one kv_lora_rank + rope row per token): chunked prefill mixed with decode, prefix caching,
preemption with recompute, and the CUDA-graph static buffers (run eagerly on CPU) all give the
greedy tokens of whole prompts run one step each; bf16 agrees with transformers' bf16 up to a
measured near tie."""

from __future__ import annotations

import pytest

from tests.engine.test_moe_engine import (check_bfloat16_matches_transformers_up_to_a_near_tie,
                                          check_engine_paths_match_whole_prompts,
                                          check_static_decode_buffers_match_the_eager_path)
from tests.models.harness import save_tiny_model
from tests.models.test_deepseek import CASES

CONFIG = CASES["v2_lite"]
BYTES_PER_TOKEN = 3 * (32 + 8) * 4  # layers x (kv_lora_rank + rope dim) x float32


@pytest.fixture(scope="module")
def mla_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-deepseek-v2-lite")
    save_tiny_model(CONFIG, path)
    return path


def test_chunked_prefill_prefix_caching_and_preemption_match_whole_prompts(mla_dir):
    check_engine_paths_match_whole_prompts(mla_dir, BYTES_PER_TOKEN)


def test_static_decode_buffers_match_the_eager_path(mla_dir):
    check_static_decode_buffers_match_the_eager_path(mla_dir)


def test_bfloat16_matches_transformers_up_to_a_near_tie(mla_dir):
    """bf16 through the latent cache (and the float32 router) against transformers' bf16."""
    check_bfloat16_matches_transformers_up_to_a_near_tie(mla_dir)
