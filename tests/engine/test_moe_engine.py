"""The engine's paths on a mixture-of-experts model (a tiny random Qwen3-MoE: a dense layer, q/k
norms, 8 experts top-2): chunked prefill mixed with decode, prefix caching, preemption with
recompute, and the CUDA-graph static buffers (run eagerly on CPU) all give the greedy tokens of
whole prompts run one step each, and the bf16 path agrees with transformers' bf16 (eager experts)
up to a measured near tie."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from fastgen import LLM, SamplingParams
from tests.engine.test_decode_graphs import BLOCK_SIZE, with_static_buffers
from tests.models.harness import VOCAB, save_tiny_model

CONFIG = Qwen3MoeConfig(hidden_size=64, intermediate_size=48, moe_intermediate_size=24,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                        mlp_only_layers=[0], max_position_embeddings=256,
                        tie_word_embeddings=False)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
BYTES_PER_TOKEN = 3 * 2 * 2 * 32 * 4  # layers x (K, V) x KV heads x head dim x float32


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    save_tiny_model(CONFIG, path)
    return path


def prompts(count: int, seed: int = 0, prefix: list[int] = ()) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (count,), generator=g).tolist()
    return [list(prefix) + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def tokens(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]


def make_llm(path, **kwargs) -> LLM:
    kwargs.setdefault("cpu_kv_cache_gib", 0.01)
    return LLM(str(path), dtype="float32", device="cpu", **kwargs)


def check_engine_paths_match_whole_prompts(model_dir, bytes_per_token: int) -> None:
    """Chunked prefill (with prefix-cache hits on a repeat) and preemption with recompute give
    the greedy tokens of whole prompts run one step each. bytes_per_token: the model's KV cache
    per token in float32, to size a cache that forces preemption."""
    shared = prompts(1, seed=5)[0] * 2  # a long shared prefix: whole blocks of it get cached
    batch = prompts(6) + prompts(3, seed=1, prefix=shared)
    whole = tokens(make_llm(model_dir, max_num_batched_tokens=4096, enable_prefix_caching=False),
                   batch)

    chunked = make_llm(model_dir, max_num_batched_tokens=7, block_size=4)
    assert chunked.engine.kv_cache_bytes_per_token == bytes_per_token
    assert tokens(chunked, batch) == whole
    assert tokens(chunked, batch) == whole  # again, now mostly from the prefix cache
    assert chunked.engine.stats.prefix_cache_hit_tokens > 0

    # room for about 40 blocks of 4 tokens, where the batch needs ~80: the newest are preempted
    small = make_llm(model_dir, block_size=4, cpu_kv_cache_gib=40 * 4 * bytes_per_token / 2**30)
    assert tokens(small, batch) == whole
    assert small.engine.scheduler.num_preemptions > 0


def check_static_decode_buffers_match_the_eager_path(model_dir) -> None:
    batch = prompts(5, seed=2)
    expected = tokens(make_llm(model_dir, block_size=BLOCK_SIZE, max_num_seqs=16), batch)
    llm = make_llm(model_dir, block_size=BLOCK_SIZE, max_num_seqs=16)
    sizes = with_static_buffers(llm.engine)  # every step checked against an eager forward
    assert tokens(llm, batch) == expected
    assert 5 in sizes


def test_chunked_prefill_prefix_caching_and_preemption_match_whole_prompts(moe_dir):
    check_engine_paths_match_whole_prompts(moe_dir, BYTES_PER_TOKEN)


def test_static_decode_buffers_match_the_eager_path(moe_dir):
    check_static_decode_buffers_match_the_eager_path(moe_dir)


def test_bfloat16_matches_transformers_up_to_a_near_tie(moe_dir):
    check_bfloat16_matches_transformers_up_to_a_near_tie(moe_dir)


def check_bfloat16_matches_transformers_up_to_a_near_tie(model_dir) -> None:
    """As the default model's bf16 test: tokens agree up to a first divergence, and there the
    float32 model's scores of the two choices are closer than twice HF bf16's own logit error."""
    batch = prompts(4, seed=3)
    ours = tokens(LLM(str(model_dir), dtype="bfloat16", device="cpu", cpu_kv_cache_gib=0.01),
                  batch)
    hf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                experts_implementation="eager").eval()
    hf32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, mine in zip(batch, ours):
        with torch.inference_mode():
            out = hf16.generate(torch.tensor([prompt]), max_new_tokens=len(mine), do_sample=False,
                                min_new_tokens=len(mine))
        theirs = out[0, len(prompt):].tolist()
        diverged = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        if diverged is None:
            assert mine == theirs
            continue
        ids = torch.tensor([prompt + mine[:diverged]])
        with torch.inference_mode():
            exact = hf32(ids).logits[0, -1].float()
            rounded = hf16(ids).logits[0, -1].float()
        gap = (exact[mine[diverged]] - exact[theirs[diverged]]).abs()
        assert gap <= 2 * (rounded - exact).abs().max(), (diverged, gap)
