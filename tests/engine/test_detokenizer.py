"""Incremental detokenization on the tiny byte-level BPE tokenizer: split multi-byte characters
are held back, stop strings spanning tokens are cut and never streamed, EOS / stop ids and
max_tokens end a request."""

import pytest

from fastgen.config import SamplingParams
from fastgen.engine.sequence import FinishReason
from tests.engine.text_stream import TextStream
from tests.engine.tiny_model import build_tokenizer

TEXT = "The capital of France is Paris. Café 🙂 日本語, naïve!"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def feed(detok: TextStream, token_ids: list[int]) -> tuple[list[str], int]:
    """Appends tokens until one finishes the request; returns the streamed deltas and how many
    tokens were taken."""
    deltas = []
    for count, token in enumerate(token_ids, start=1):
        reason = detok.append(token)
        deltas.append(detok.pop_delta())
        if reason is not None:
            return deltas, count
    return deltas, len(token_ids)


def make(tokenizer, prompt="Hello", eos=(), **params) -> TextStream:
    params.setdefault("max_tokens", 100)
    return TextStream(tokenizer, tokenizer.encode(prompt), SamplingParams(**params), list(eos))


def test_multibyte_characters_split_across_tokens_are_held_back(tokenizer):
    ids = tokenizer.encode(TEXT)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the test needs characters split across tokens
    detok = make(tokenizer)
    deltas, _ = feed(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == TEXT


def test_stop_string_across_tokens_is_cut_and_never_streamed(tokenizer):
    ids = tokenizer.encode(TEXT)
    detok = make(tokenizer, stop=["ital of F", "zzz"])
    deltas, used = feed(detok, ids)
    assert detok.finish_reason is FinishReason.STOP
    assert detok.text == "The cap" == "".join(deltas)
    assert tokenizer.decode(ids[:used]).find("ital of F") >= 0  # stopped at the completing token
    assert tokenizer.decode(ids[:used - 1]).find("ital of F") < 0


def test_eos_and_stop_token_ids_stop_without_adding_text(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Paris.")
    detok = make(tokenizer, eos=[eos])
    deltas, used = feed(detok, ids + [eos] + ids)
    assert (used, detok.text, detok.finish_reason) == (len(ids) + 1, "Paris.", FinishReason.STOP)
    detok = make(tokenizer, eos=[eos], ignore_eos=True)
    feed(detok, ids + [eos] + ids)
    assert detok.finish_reason is None and detok.text == "Paris.Paris."
    detok = make(tokenizer, stop_token_ids=[ids[1]])
    _, used = feed(detok, ids)
    assert used == 2 and detok.text == tokenizer.decode(ids[:1])


def test_max_tokens_stops_with_length(tokenizer):
    ids = tokenizer.encode(TEXT)
    detok = make(tokenizer, max_tokens=3)
    deltas, used = feed(detok, ids)
    assert used == 3 and detok.finish_reason is FinishReason.LENGTH
    assert "".join(deltas) == detok.text == tokenizer.decode(ids[:3])
    with pytest.raises(RuntimeError):
        detok.append(ids[3])


def test_prompt_context_does_not_leak_into_the_text(tokenizer):
    detok = make(tokenizer, prompt="Once upon a")
    feed(detok, tokenizer.encode(" time there was"))
    assert detok.text == " time there was"
