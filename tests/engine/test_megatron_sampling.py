"""Megatron's per-step sampling rules through the engine on the tiny model: top_p decaying token by
token (SamplingParams.top_p_at, and the sampler's per-row top_p), and prevent_newline_after_colon
(no token starting with a newline right after one ending with ":")."""

import pytest
import torch

from fastgen import SamplingParams
from fastgen.engine.model_input import NewlineAfterColon
from fastgen.engine.sampler import Sampler
from tests.engine.test_continuous_batching import make_llm
from tests.engine.tiny_model import save_tiny_llama


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return make_llm(save_tiny_llama(tmp_path_factory.mktemp("tiny-megatron-sampling")))


def test_top_p_at_decays_down_to_the_bound():
    params = SamplingParams(top_p=0.9, top_p_decay=0.5, top_p_bound=0.2)
    assert [params.top_p_at(k) for k in range(4)] == [0.9, 0.45, 0.225, 0.2]
    assert SamplingParams(top_p=0.9).top_p_at(10) == 0.9
    with pytest.raises(ValueError, match="top_p_decay needs top_p"):
        SamplingParams(top_p_decay=0.5)


def test_the_sampler_takes_each_rows_top_p():
    """A row whose step top_p is tiny samples its argmax; its params' top_p is ignored."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0)) * 0.1
    params = [SamplingParams(top_p=1.0, seed=1)] * 2
    generators = [torch.Generator().manual_seed(s) for s in range(2)]
    for _ in range(5):
        tokens = Sampler(torch.device("cpu"), seed=0)(logits, params, generators,
                                                        top_p=[1e-9, 1e-9])
        assert tokens.tolist() == logits.argmax(-1).tolist()


def test_newline_after_colon_sets(llm):
    rule = NewlineAfterColon.of(llm.tokenizer, llm.engine.vocab_size)
    colon = llm.tokenizer.encode(":", add_special_tokens=False)[-1]
    newline = llm.tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert colon in rule.colon_ids and newline in rule.newline_ids
    assert rule.banned_after(colon) == rule.newline_ids and rule.banned_after(newline) == []


def test_prevent_newline_after_colon_bans_newlines_after_a_colon(llm):
    tokenizer = llm.tokenizer
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    prompt = tokenizer.encode("Numbers:", add_special_tokens=False)
    push = {"max_tokens": 1, "temperature": 0, "logit_bias": {newline: 100.0}}
    [free] = llm.generate([prompt], SamplingParams(**push), use_tqdm=False)
    assert free.outputs[0].token_ids == [newline]
    [kept] = llm.generate([prompt], SamplingParams(**push, prevent_newline_after_colon=True),
                          use_tqdm=False)
    token = kept.outputs[0].token_ids[0]
    assert not tokenizer.decode([token]).startswith("\n")
    # After a token that is not a colon, the rule lets the newline through.
    plain = tokenizer.encode("Numbers", add_special_tokens=False)
    [after_word] = llm.generate([plain], SamplingParams(**push, prevent_newline_after_colon=True),
                                use_tqdm=False)
    assert after_word.outputs[0].token_ids == [newline]
