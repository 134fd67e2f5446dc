"""Tensor parallelism end to end on the CPU: LLM(..., tensor_parallel_size=N) starts N - 1 worker
processes, each loading its shard of a checkpoint, and gives the greedy tokens of one process and
logprobs within float32 rounding (the row-parallel sums are split across ranks), for every family
(MoE ones with both expert placements) and the default model at TP 3; plus the errors a layout
that cannot run gives."""

from __future__ import annotations

import copy

import pytest
from fastgen import LLM, SamplingParams
from fastgen.loader.hf import ModelLoadError

from tests.engine.tiny_model import save_tiny_deepseek_v2_lite, save_tiny_llama
from tests.models import (
    test_deepseek,
    test_llama,
    test_llama4,
    test_moe_models,
    test_qwen,
)
from tests.models.harness import save_tiny_model

PROMPTS = [[5, 17, 42, 99, 3], [200, 7], list(range(30, 70))]


def generate(folder, tp: int, **kwargs):
    llm = LLM(str(folder), dtype="float32", device="cpu", tensor_parallel_size=tp, **kwargs)
    try:
        params = SamplingParams(max_tokens=10, temperature=0, logprobs=2, ignore_eos=True)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    finally:
        llm.engine.close()


def assert_same_generation(got, want, atol: float = 2e-4):
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want):
        assert tokens == want_tokens
        for step, want_step in zip(logprobs, want_logprobs):
            assert step.keys() == want_step.keys()
            for token, value in want_step.items():
                assert step[token] == pytest.approx(value, abs=atol)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tp") / "llama")


def test_llama_tp2_generates_what_one_process_does(tiny_llama):
    assert_same_generation(generate(tiny_llama, 2), generate(tiny_llama, 1))


def test_deepseek_v2_lite_tp2_generates_what_one_process_does(tmp_path):
    """MLA (heads split, the latent cache replicated) and MoE (experts' intermediate split)."""
    folder = save_tiny_deepseek_v2_lite(tmp_path / "v2-lite")
    assert_same_generation(generate(folder, 2), generate(folder, 1))


def replace(config, **changes):
    config = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(config, name, value)
    return config


# Every family, tiny random configs from the models' tests: GQA with KV heads split and (one KV
# head) replicated, a sliding window, per-head q/k norm, MoE with and without shared experts,
# Llama 4's chunked attention and MoE, MLA with q LoRA and group-limited routing.
FAMILIES = {
    "llama": test_llama.CASES["llama"],
    # 4 query heads over one KV head, which each rank keeps whole
    "mistral_sliding_window": replace(test_llama.CASES["mistral_sliding_window"],
                                      num_attention_heads=4, num_key_value_heads=1),
    "qwen3": test_qwen.CASES["qwen3"],
    "mixtral": test_moe_models.CASES["mixtral"],
    "qwen3_moe": test_moe_models.CASES["qwen3_moe"],
    "qwen2_moe": test_moe_models.CASES["qwen2_moe"],
    "llama4": test_llama4.CASES["llama4_text"],
    "deepseek_v2": test_deepseek.CASES["v2"],
    "deepseek_v3": test_deepseek.CASES["v3"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_tp2_generates_what_one_process_does(family, tmp_path):
    save_tiny_model(FAMILIES[family], tmp_path)
    assert_same_generation(generate(tmp_path, 2), generate(tmp_path, 1))


EXPERT_PARALLEL = {**{name: FAMILIES[name]
                      for name in ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3")},
                   # Llama 4's weight-on-input routing, with 6 experts for 2 ranks
                   "llama4": replace(FAMILIES["llama4"], num_local_experts=6)}


@pytest.mark.parametrize("family", list(EXPERT_PARALLEL))
def test_expert_parallel_tp2_generates_what_one_process_does(family, tmp_path):
    """Whole experts on each rank (E / 2), the router on both: the same tokens as one process."""
    save_tiny_model(EXPERT_PARALLEL[family], tmp_path)
    assert_same_generation(generate(tmp_path, 2, enable_expert_parallel=True),
                           generate(tmp_path, 1))


def test_a_dimension_that_does_not_split_is_named(tiny_llama):
    with pytest.raises(ModelLoadError, match="for tensor-parallel size 3: .*does not split over "
                                             "tensor-parallel size 3"):
        LLM(str(tiny_llama), dtype="float32", device="cpu", tensor_parallel_size=3)


@pytest.mark.slow
def test_default_model_tp3_generates_what_one_process_does():
    """SmolLM2-135M as its GGUF stores it (Q4_1 layers, Q8_0 table): 9 heads, 3 KV heads, 1536
    intermediate and 49152 vocabulary split 3 ways (it cannot split 2 ways), the row-parallel
    layers' quantized rows split in whole blocks, in float32. The ranks' partial sums round
    differently and the activations' int8 digits follow their inputs' last bits, so the logprobs
    agree to the quantized path's tolerance (twice its logit bound), not to float32's."""
    from fastgen.loader.hub import default_model_dir
    from fastgen.ops.tolerances import QUANT_LOGIT_TOLERANCES

    folder = default_model_dir()
    assert_same_generation(generate(folder, 3), generate(folder, 1),
                           atol=2 * QUANT_LOGIT_TOLERANCES["Q4_1"]["atol"])


def test_quantized_experts_tp2_generate_what_one_process_does(tmp_path):
    """Experts that stay quantized (fastgen.layers.moe): a qwen3moe GGUF file's Q8_0 experts with
    each rank keeping its whole blocks of every expert's intermediate dimension, or whole
    experts on each rank (expert parallelism). The ranks' partial sums round
    differently and the activations' int8 digits follow their inputs' last bits, so the logprobs
    agree to the quantized path's tolerance (twice its logit bound)."""
    import torch
    from fastgen.ops.tolerances import QUANT_LOGIT_TOLERANCES
    from transformers import AutoModelForCausalLM

    from tests.models.harness import randomized
    from tests.models.test_gguf_archs import CASES, write_gguf

    arch, config, qtype = CASES["qwen3moe_q8_0"]
    config = replace(config, moe_intermediate_size=64)  # 32 per rank: one Q8_0 block
    torch.manual_seed(0)
    model = randomized(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()
    path = tmp_path / "moe.gguf"
    write_gguf(path, arch, model, qtype)
    atol = 2 * QUANT_LOGIT_TOLERANCES[qtype]["atol"]
    one_process = generate(path, 1)
    assert_same_generation(generate(path, 2), one_process, atol=atol)
    assert_same_generation(generate(path, 2, enable_expert_parallel=True), one_process, atol=atol)
