"""fastgen.tokenization: render_chat gives what every entrypoint wrote by hand (the template's text,
tokenized without adding special tokens again: one BOS, not two) and raises what the tokenizer
raises; continuation_text keeps the space a SentencePiece decoder drops at the start of a text;
TokenText gives each token's own bytes (byte-level BPE, SentencePiece pieces and byte fallback)."""

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from fastgen.tokenization import (
    BYTE_OF_CHAR,
    CONTEXT_TOKENS,
    TokenText,
    bytes_to_unicode,
    continuation_text,
    render_chat,
    render_chat_prompt,
)
from tests.engine.tiny_model import CHAT_TEMPLATE, CORPUS, build_tokenizer

CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Café 🙂: what is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny():
    return build_tokenizer()


def with_bos(tokenizer) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with a post-processor that puts BOS before every encoded text (as
    Llama's does) and a template that writes BOS itself."""
    backend = tokenizer.backend_tokenizer
    bos = tokenizer.bos_token
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos,
                                   eos_token=tokenizer.eos_token,
                                   chat_template="{{ bos_token }}" + CHAT_TEMPLATE)


def test_render_chat_is_the_template_tokenized_without_special_tokens(tiny):
    text = tiny.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    rendered = render_chat_prompt(tiny, CONVERSATION)
    assert rendered.text == text and text.endswith("<|im_start|>assistant\n")
    assert rendered.token_ids == tiny.encode(text, add_special_tokens=False)
    assert render_chat(tiny, CONVERSATION) == rendered.token_ids
    # What apply_chat_template's own tokenization gives (the benchmarks used it).
    assert rendered.token_ids == tiny.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_render_chat_adds_no_second_bos():
    tokenizer = with_bos(build_tokenizer())
    bos = tokenizer.bos_token_id
    assert tokenizer.encode("Hi")[0] == bos  # encode adds one by default
    ids = render_chat(tokenizer, CONVERSATION)
    assert ids[0] == bos and ids.count(bos) == 1


def test_render_chat_raises_what_the_tokenizer_raises(tiny):
    plain = PreTrainedTokenizerFast(tokenizer_object=tiny.backend_tokenizer)
    assert plain.chat_template is None
    with pytest.raises(ValueError) as direct:
        plain.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    with pytest.raises(ValueError) as ours:
        render_chat(plain, CONVERSATION)
    assert str(ours.value) == str(direct.value)

    refusing = build_tokenizer()
    refusing.chat_template = "{{ raise_exception('only one message, please') }}"
    with pytest.raises(Exception) as direct:
        refusing.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    with pytest.raises(type(direct.value), match="only one message, please"):
        render_chat(refusing, CONVERSATION)


def test_continuation_text_keeps_a_leading_space():
    """A SentencePiece-like decode (each id a word piece, the text's first space dropped): decoding
    the generation alone would lose the space before its first word."""
    words = {i: f" w{i}" for i in range(100)}

    def decode(ids: list[int]) -> str:
        return "".join(words[i] for i in ids).removeprefix(" ")

    prompt = list(range(12))
    assert continuation_text(decode, prompt, [50, 51]) == " w50 w51"
    assert decode([50, 51]) == "w50 w51"
    assert continuation_text(decode, prompt, []) == ""
    assert continuation_text(decode, [], [50]) == "w50"  # no prompt: nothing before it

    seen = []
    continuation_text(lambda ids: seen.append(list(ids)) or decode(ids), prompt, [50])
    assert seen == [prompt[-CONTEXT_TOKENS:], prompt[-CONTEXT_TOKENS:] + [50]]


def test_continuation_text_with_the_tiny_tokenizer(tiny):
    prompt = tiny.encode("The capital of France is")
    generated = tiny.encode(" Paris. Straße 日本語")
    decode = lambda ids: tiny.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert continuation_text(decode, prompt, generated) == " Paris. Straße 日本語"


def test_byte_level_alphabet_covers_every_byte():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert {BYTE_OF_CHAR[c] for c in table.values()} == set(range(256))
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120"  # GPT-2's "Ġ"


def test_token_bytes_of_a_byte_level_tokenizer_join_into_the_text(tiny):
    tokens = TokenText(tiny)
    for text in CORPUS:
        ids = tiny.encode(text, add_special_tokens=False)
        assert b"".join(tokens.bytes(t) for t in ids) == text.encode()
        # A token alone may hold part of a character: shown as U+FFFD, never dropped.
        assert all(tokens.string(t) == tokens.bytes(t).decode("utf-8", errors="replace")
                   for t in ids)
    split = [t for t in tiny.encode("日本語", add_special_tokens=False)
             if "\ufffd" in tokens.string(t)]
    assert split, "the corpus should split a character across tokens"
    assert tokens.strings(split) == [tokens.string(t) for t in split]


def test_token_bytes_of_a_sentencepiece_tokenizer():
    from tokenizers import SentencePieceBPETokenizer

    backend = SentencePieceBPETokenizer()
    backend.train_from_iterator(CORPUS * 4, vocab_size=200, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_tokens(["<0xE2>"])
    tokens = TokenText(tokenizer)
    word = tokenizer.convert_tokens_to_ids("\u2581The")
    assert tokens.bytes(word) == b" The"
    assert tokens.bytes(tokenizer.convert_tokens_to_ids("<0xE2>")) == b"\xe2"
