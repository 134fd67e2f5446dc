"""End to end on a tiny random-weight Llama saved in Hugging Face format, in float32: fastgen's
greedy tokens equal transformers' generate(do_sample=False), run one prompt at a time."""

import json

import pytest
import torch

from fastgen import LLM, SamplingParams
from fastgen.engine.sequence import FinishReason
from tests.engine.tiny_model import save_tiny_llama

PROMPTS = ["The capital of France is", "Once upon a time there was a small model that answered",
           "Hi"]
MAX_TOKENS = 24
EOS_STEP = 4  # the tiny model's EOS is set to what prompt 0 greedily generates at this step


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_tokens)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, HF model, tokenizer): the EOS id written into its configs is a token that
    prompt 0 generates greedily, so EOS stopping can be tested on a random model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokens = hf_greedy(model, tokenizer.encode(PROMPTS[0]), MAX_TOKENS)
    step = next(i for i in range(EOS_STEP, MAX_TOKENS) if tokens[i] not in tokens[:i])
    eos = tokens[step]
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = eos
        (path / name).write_text(json.dumps(config))
    model.generation_config.eos_token_id = eos
    return path, model, tokenizer, eos, step


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(str(tiny[0]), dtype="float32", device="cpu", cpu_kv_cache_gib=0.01)


def test_greedy_matches_transformers_for_a_batch_of_prompts(tiny, llm):
    _, hf_model, tokenizer, eos, step = tiny
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    for prompt, out in zip(PROMPTS, outs):
        expected = hf_greedy(hf_model, tokenizer.encode(prompt), MAX_TOKENS)
        assert out.prompt == prompt and out.prompt_token_ids == tokenizer.encode(prompt)
        assert out.token_ids == expected
        # Random weights emit stray bytes; windowed decoding may render an invalid byte run
        # with a different number of U+FFFD than decoding all at once. The valid text agrees.
        text = tokenizer.decode(expected, skip_special_tokens=True)
        assert out.text.replace("\ufffd", "") == text.replace("\ufffd", "")
    assert outs[0].token_ids[-1] == eos and len(outs[0].token_ids) == step + 1
    assert outs[0].finish_reason is FinishReason.STOP


def test_max_tokens_and_ignore_eos(tiny, llm):
    _, _, _, eos, step = tiny
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                  ignore_eos=True))[0]
    assert len(out.token_ids) == MAX_TOKENS and out.finish_reason is FinishReason.LENGTH
    assert out.token_ids[step] == eos
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(out.token_ids) == 3 and out.finish_reason is FinishReason.LENGTH


def test_stop_strings_and_stop_token_ids(llm):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    full = llm.generate(PROMPTS[1], params)[0]
    clean = [i for i in range(4, len(full.text) - 3) if "\ufffd" not in full.text[i:i + 3]]
    stop = full.text[clean[0]:clean[0] + 3]
    params.stop = [stop]
    out = llm.generate(PROMPTS[1], params)[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == full.text[: full.text.find(stop)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    params.stop, params.stop_token_ids = [], [full.token_ids[5]]
    out = llm.generate(PROMPTS[1], params)[0]
    assert out.token_ids == full.token_ids[: full.token_ids.index(full.token_ids[5]) + 1]


def test_preemption_under_a_small_cache_keeps_greedy_results(tiny, llm):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
    # Blocks of 4 tokens, 512 bytes per token (2 layers x K, V x 2 heads x 16 x 4 bytes): 14 blocks,
    # fewer than the three sequences' ~27 together.
    small = LLM(str(tiny[0]), dtype="float32", device="cpu", block_size=4,
                cpu_kv_cache_gib=14 * 4 * 512 / 2**30)
    assert small.engine.model_runner.num_blocks == 14
    assert [o.token_ids for o in small.generate(PROMPTS, params)] == expected


def test_seeded_sampling_does_not_depend_on_batch_mates(llm):
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded)[0].token_ids
    others = [SamplingParams(max_tokens=12, temperature=0.9, ignore_eos=True)] * 2
    batch = llm.generate(PROMPTS, [seeded] + others)
    assert batch[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    assert llm.generate(PROMPTS[0], other_seed)[0].token_ids != alone


def test_streaming_deltas_add_up_to_the_text(llm):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = llm.generate(PROMPTS[2], params)[0]
    ids = llm.tokenizer.encode(PROMPTS[2])
    outs = list(llm.engine.stream(ids, params))
    assert len(outs) == MAX_TOKENS and outs[-1].finished
    assert "".join(o.delta for o in outs) == expected.text
    assert outs[-1].token_ids == expected.token_ids


def test_too_long_prompts_are_refused_and_max_tokens_capped(llm):
    context = llm.max_model_len
    with pytest.raises(ValueError, match=f"context is {context} tokens"):
        llm.generate([[5] * context])
    out = llm.generate([[5] * (context - 3)], SamplingParams(max_tokens=50, temperature=0,
                                                            ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason is FinishReason.LENGTH
    assert not llm.engine.has_unfinished()


def test_chat_applies_the_template(tiny, llm):
    tokenizer = tiny[2]
    conversation = [{"role": "user", "content": "Hi"}]
    out = llm.chat(conversation, SamplingParams(max_tokens=4, temperature=0))[0]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
