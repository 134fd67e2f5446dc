"""Per-request sampling parameters beyond temperature / top-k / top-p: min-p, the repetition,
presence and frequency penalties (checked on hand-made logits against a plain loop over the
formulas, and end to end against transformers' greedy generate), logprobs, and validation."""

import math

import pytest
import torch

from fastgen import LLM, SamplingParams
from fastgen.config import MAX_LOGPROBS
from fastgen.engine.sampler import Sampler, TokenHistory, apply_penalties, top_logprobs
from fastgen.ops.tolerances import assert_close, assert_logits_close
from tests.engine.tiny_model import save_tiny_llama

VOCAB = 50


def random_logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def reference_penalties(logits: torch.Tensor, params: SamplingParams,
                        history: TokenHistory) -> torch.Tensor:
    """The formulas of SamplingParams, one token at a time. logits: [V] -> [V]"""
    out = logits.clone()
    output = history.token_ids[history.num_prompt_tokens:]
    for token in set(history.token_ids):
        r = params.repetition_penalty
        out[token] = out[token] / r if out[token] > 0 else out[token] * r
    for token in set(output):
        out[token] -= params.presence_penalty + params.frequency_penalty * output.count(token)
    return out


def test_penalties_follow_the_formulas():
    logits = random_logits(4, seed=3)
    params = [SamplingParams(repetition_penalty=1.7),
              SamplingParams(presence_penalty=0.8, frequency_penalty=0.3),
              SamplingParams(repetition_penalty=0.6, presence_penalty=-0.5, frequency_penalty=1.1),
              SamplingParams()]
    histories = [TokenHistory([1, 2, 2, 7, 2, 9, 9], 3), TokenHistory([4, 5, 5, 5, 6], 2),
                 TokenHistory([0, 49, 3, 3, 0], 1), TokenHistory([11, 12], 2)]
    out = apply_penalties(logits, params, histories)
    for row in range(4):
        expected = reference_penalties(logits[row], params[row], histories[row])
        assert_close(out[row], expected)
    assert torch.equal(out[3], logits[3])  # a row without penalties is untouched


def test_greedy_applies_penalties_before_argmax():
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    history = [TokenHistory([0, 0], 1)]
    plain = Sampler("cpu", seed=0)(logits, [SamplingParams(temperature=0)], [None], history)
    penalised = Sampler("cpu", seed=0)(
        logits, [SamplingParams(temperature=0, repetition_penalty=2.0)], [None], history)
    assert plain.item() == 0 and penalised.item() == 1


def test_min_p_never_samples_excluded_tokens():
    logits = random_logits(2, seed=1)
    params = [SamplingParams(temperature=1.5, min_p=0.2), SamplingParams(temperature=1.0, min_p=0.05)]
    sampler = Sampler("cpu", seed=0)
    allowed = []
    for row, p in enumerate(params):
        probs = (logits[row] / p.temperature).softmax(-1)
        allowed.append(set((probs >= p.min_p * probs.max()).nonzero()[:, 0].tolist()))
    seen = [set(), set()]
    for _ in range(300):
        for row, token in enumerate(sampler(logits, params, [None, None]).tolist()):
            seen[row].add(token)
    for row in range(2):
        assert seen[row] <= allowed[row] and len(seen[row]) > 1


def test_top_logprobs_are_sorted_and_hold_the_sampled_token():
    logits = random_logits(3, seed=2)
    params = [SamplingParams(logprobs=5), SamplingParams(), SamplingParams(logprobs=0)]
    sampled = torch.tensor([logits[0].argmin().item(), 0, 7])
    out = top_logprobs(logits, sampled, [p.logprobs for p in params])
    reference = logits.log_softmax(-1)
    assert out[1] is None
    top = list(out[0].items())[:5]
    assert [t for t, _ in top] == reference[0].topk(5).indices.tolist()
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert len(out[0]) == 6  # the least likely token was sampled: one more entry
    for row, token in ((0, sampled[0].item()), (2, 7)):
        assert math.isclose(out[row][token], reference[row, token].item(), abs_tol=1e-6)
    assert list(out[2]) == [7]


def test_validation():
    for kwargs, word in [({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
                         ({"repetition_penalty": 0.0}, "repetition_penalty"),
                         ({"presence_penalty": 2.5}, "presence_penalty"),
                         ({"frequency_penalty": -3.0}, "frequency_penalty"),
                         ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
                         ({"logprobs": -1}, "logprobs")]:
        with pytest.raises(ValueError, match=word):
            SamplingParams(**kwargs)
    SamplingParams(min_p=0.1, repetition_penalty=1.2, presence_penalty=-2, frequency_penalty=2,
                   logprobs=MAX_LOGPROBS)


# End to end on the tiny float32 Llama, against transformers.

PROMPTS = ["The capital of France is", "Once upon a time there was a small model"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate all MAX_TOKENS, as ignore_eos does
    llm = LLM(str(path), dtype="float32", device="cpu", cpu_kv_cache_gib=0.01)
    return llm, model, tokenizer


def hf_generate(model, prompt_ids: list[int], **kwargs):
    ids = torch.tensor([prompt_ids])
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=MAX_TOKENS, **kwargs)


def test_greedy_repetition_penalty_matches_transformers(tiny):
    llm, model, tokenizer = tiny
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, repetition_penalty=1.3,
                            ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    plain = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                 ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] != [o.token_ids for o in plain]  # the penalty bites
    for prompt, out in zip(PROMPTS, outs):
        ids = tokenizer.encode(prompt)
        expected = hf_generate(model, ids, repetition_penalty=1.3)[0, len(ids):].tolist()
        assert out.token_ids == expected
        assert out.logprobs is None


def test_greedy_logprobs_match_transformers(tiny):
    llm, model, tokenizer = tiny
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=3, ignore_eos=True)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False)):
        ids = tokenizer.encode(prompt)
        hf = hf_generate(model, ids, output_logits=True, return_dict_in_generate=True)
        assert out.token_ids == hf.sequences[0, len(ids):].tolist()
        assert len(out.logprobs) == MAX_TOKENS
        expected = torch.cat(hf.logits).float().log_softmax(-1)  # [MAX_TOKENS, V]
        for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            assert len(entry) == 3 and list(entry)[0] == token  # greedy: the top one
            top = expected[step].topk(3)
            assert list(entry) == top.indices.tolist()
            assert_logits_close(torch.tensor(list(entry.values())), top.values, torch.float32)
