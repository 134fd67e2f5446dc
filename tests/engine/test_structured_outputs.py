"""Structured outputs through the engine on the tiny random Llama, sampling at temperature 1 (a
random model left alone writes anything, so every valid output below is the constraint's doing):
each kind of constraint holds on every sample, with n > 1, with and without step graphs (and,
marked gpu, under CUDA graphs); unconstrained requests batched beside constrained ones are
untouched; a constraint that cannot finish within max_tokens ends with "length"; invalid ones are
ValueErrors before anything runs.
The masking kernel and logit_bias are checked against plain loops, on an odd vocabulary."""

import json
import re

import jsonschema
import pytest
import torch

from fastgen import LLM, SamplingParams, StructuredOutputs
from fastgen.engine.sampler import apply_logit_bias, apply_token_bitmask
from fastgen.engine.structured_output import bitmask_width
from fastgen.outputs import FinishReason
from tests.engine.test_continuous_batching import make_llm
from tests.engine.tiny_model import save_tiny_llama

PROMPTS = ["The capital of France is", "Once upon a time", "Numbers: 0 1 2"]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "maxItems": 3}}}
GRAMMAR = '''root ::= greeting " " name "!"
greeting ::= "hello" | "hi"
name ::= [a-z]+'''


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-structured"))


ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module", params=["graphs", "eager", pytest.param("cuda", marks=ON_CUDA)])
def llm(request, model_path, tmp_path_factory):
    """CPU step graphs, eager, and CUDA graphs (the masks filled beside captured decode steps)."""
    if request.param == "cuda":  # head size 64: one the CUDA attention kernels take
        folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-structured-cuda"), hidden_size=128,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=64)
        return LLM(str(folder), dtype="float32", device="cuda", max_num_seqs=32)
    return make_llm(model_path, enforce_eager=request.param == "eager")


def sample(llm, constraint, max_tokens=120, n=3, seed=0):
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, n=n,
                            structured_outputs=constraint)
    return [c for out in llm.generate(PROMPTS, params, use_tqdm=False) for c in out.outputs]


def test_json_schema_outputs_validate(llm):
    for choice in sample(llm, StructuredOutputs(json=PERSON)):
        assert choice.finish_reason is FinishReason.STOP, choice.text
        jsonschema.validate(json.loads(choice.text), PERSON)


def test_json_object_mode_gives_json_objects(llm):
    for choice in sample(llm, StructuredOutputs(json_object=True), max_tokens=200):
        if choice.finish_reason is FinishReason.STOP:
            assert isinstance(json.loads(choice.text), dict)
        else:  # a random model may open an endless string; what it wrote is still a prefix
            assert choice.finish_reason is FinishReason.LENGTH and choice.text.startswith("{")


def test_regex_choice_and_grammar_hold(llm):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for choice in sample(llm, StructuredOutputs(regex=pattern)):
        assert re.fullmatch(pattern, choice.text) and choice.finish_reason is FinishReason.STOP
    options = ["Paris", "Berlin", "Rome"]
    texts = [c.text for c in sample(llm, StructuredOutputs(choice=options), n=4)]
    assert set(texts) <= set(options) and len(set(texts)) > 1  # sampled, not always the same
    for choice in sample(llm, StructuredOutputs(grammar=GRAMMAR), max_tokens=60):
        if choice.finish_reason is FinishReason.STOP:
            assert re.fullmatch(r"(hello|hi) [a-z]+!", choice.text), choice.text
        else:
            assert re.fullmatch(r"(hello|hi) [a-z]*", choice.text), choice.text


def test_unconstrained_requests_beside_constrained_ones_are_untouched(llm):
    plain = SamplingParams(max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)
    alone = llm.generate(PROMPTS, plain, use_tqdm=False)
    constrained = SamplingParams(max_tokens=40, temperature=1.0, seed=6,
                                 structured_outputs=StructuredOutputs(json=PERSON))
    mixed = llm.generate(PROMPTS * 2, [plain] * 3 + [constrained] * 3, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in alone]


def test_a_constraint_that_cannot_finish_ends_with_length(llm):
    [out] = llm.generate(["Hi"], SamplingParams(max_tokens=3, temperature=1.0, seed=0,
                                                structured_outputs=StructuredOutputs(json=PERSON)),
                         use_tqdm=False)
    choice = out.outputs[0]
    assert choice.finish_reason is FinishReason.LENGTH and len(choice.token_ids) == 3
    assert choice.text.startswith('{"')


@pytest.mark.parametrize("constraint, message", [
    (StructuredOutputs(json={"type": "nonsense"}), "nonsense"),
    (StructuredOutputs(json="{not json"), "json"),
    (StructuredOutputs(regex="(("), "regex"),
    (StructuredOutputs(grammar="root ::= ("), "grammar"),
])
def test_invalid_constraints_are_value_errors(llm, constraint, message):
    params = SamplingParams(max_tokens=8, structured_outputs=constraint)
    with pytest.raises(ValueError, match=message):
        llm.generate(["Hi"], params, use_tqdm=False)


def test_structured_outputs_take_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputs(choice=[])


def test_compiled_grammars_are_cached(llm):
    compiler = llm.engine.grammars
    first = compiler.compile(StructuredOutputs(json=PERSON))
    assert compiler.compile(StructuredOutputs(json=json.dumps(PERSON))) is first
    assert compiler.compile(StructuredOutputs(json={**PERSON, "required": ["name"]})) is not first


# The sampler's pieces, against plain loops.

@pytest.mark.parametrize("vocab", [1, 31, 77, 200])
def test_token_bitmask_masks_exactly_the_disallowed_tokens(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g)
    rows = [0, 3, 4]
    width = bitmask_width(vocab)
    allowed = torch.rand(len(rows), vocab, generator=g) < 0.3
    bitmask = torch.zeros(len(rows), width, dtype=torch.int64)
    for r in range(len(rows)):
        for t in range(vocab):
            if allowed[r, t]:
                bitmask[r, t // 32] |= 1 << (t % 32)
    bitmask = bitmask.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") \
        else torch.where(bitmask >= 2**31, bitmask - 2**32, bitmask).to(torch.int32)
    out = apply_token_bitmask(logits, rows, bitmask)
    for b in range(5):
        for t in range(vocab):
            if b in rows and not allowed[rows.index(b), t]:
                assert out[b, t] == float("-inf")
            else:
                assert out[b, t] == logits[b, t]


def test_logit_bias_adds_to_the_named_tokens():
    logits = torch.randn(3, 77)
    params = [SamplingParams(logit_bias={5: 100.0, 76: -2.5}), SamplingParams(),
              SamplingParams(logit_bias={0: 1.0})]
    out = apply_logit_bias(logits, params)
    expected = logits.clone()
    expected[0, 5] += 100.0
    expected[0, 76] -= 2.5
    expected[2, 0] += 1.0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_logit_bias_steers_and_bans_tokens(llm):
    tokenizer = llm.tokenizer
    forced = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    [out] = llm.generate(["Hi"], SamplingParams(max_tokens=4, temperature=1.0, seed=0,
                                                logit_bias={forced: 100.0}, ignore_eos=True),
                         use_tqdm=False)
    assert out.outputs[0].token_ids == [forced] * 4
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    [plain] = llm.generate(["Hi"], greedy, use_tqdm=False)
    first = plain.outputs[0].token_ids[0]
    [banned] = llm.generate(["Hi"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                   logit_bias={first: -100.0}), use_tqdm=False)
    assert banned.outputs[0].token_ids[0] != first


def test_logit_bias_values_are_checked():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})
