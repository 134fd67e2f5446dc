"""text_decoder, the detokenizer's direct call into a fast tokenizer's Rust backend, gives what
transformers' `decode(ids, skip_special_tokens=True)` gives: on the tiny byte-level BPE tokenizer
(multi-byte characters split across tokens, special tokens, windows cut anywhere) and on the real
default model's tokenizer when it is on this machine; the clean-up of tokenization spaces exactly
where transformers applies it; tokenizers with a decode of their own are called as they are; and
incremental detokenization over it streams the same deltas as over transformers' decode."""

import functools
import random

import pytest
from transformers import PreTrainedTokenizerFast

from fastgen.config import SamplingParams
from fastgen.engine.detokenizer import text_decoder
from fastgen.engine.sequence import FinishReason
from fastgen.loader.hub import DEFAULT_MODEL_FOLDER, cache_dir
from tests.engine.text_stream import TextStream
from tests.engine.tiny_model import CORPUS, SPECIAL_TOKENS, build_tokenizer

TEXT = "The capital of France is Paris. Café 🙂 日本語, naïve! Straße . , ? won 't"


@pytest.fixture(scope="module")
def tiny():
    return build_tokenizer()


def default_tokenizer():
    folder = cache_dir() / "models" / DEFAULT_MODEL_FOLDER
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"the default model is not in {folder} (no download here)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def windows(tokenizer, seed: int = 0) -> list[list[int]]:
    """Every window of up to 8 tokens of the corpus and TEXT, each token alone, and random ids
    (special tokens among them)."""
    rng = random.Random(seed)
    out = [[i] for i in range(len(tokenizer))]
    for text in [*CORPUS, TEXT]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out += [ids[i:i + n] for n in range(1, 9) for i in range(len(ids) - n + 1)]
    specials = tokenizer.convert_tokens_to_ids(
        [t for t in SPECIAL_TOKENS if t in tokenizer.get_vocab()])
    for _ in range(500):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 12))]
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials or [0]))
        out.append(ids)
    return [*out, []]


def assert_same_as_transformers(tokenizer) -> None:
    decode = text_decoder(tokenizer)
    for ids in windows(tokenizer):
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_tiny_tokenizer_decodes_as_transformers(tiny):
    pieces = [tiny.decode([i]) for i in tiny.encode(TEXT)]
    assert any("\ufffd" in p for p in pieces)  # characters split across tokens are covered
    assert_same_as_transformers(tiny)


def test_default_model_tokenizer_decodes_as_transformers():
    assert_same_as_transformers(default_tokenizer())


def test_the_backend_is_called_directly(tiny):
    tokenizer = build_tokenizer()
    decode = text_decoder(tokenizer)
    tokenizer.decode = tokenizer._decode = None  # transformers' path is not taken
    assert decode(tiny.encode(TEXT)) == TEXT


@pytest.mark.parametrize("force", [False, True])
def test_clean_up_of_spaces_as_transformers_applies_it_to_bpe(force):
    tokenizer = build_tokenizer()
    tokenizer.clean_up_tokenization_spaces = True
    if hasattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
        tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = force
    ids = tokenizer.encode("Paris . Berlin , won 't", add_special_tokens=False)
    assert text_decoder(tokenizer)(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    assert_same_as_transformers(tokenizer)


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer (BERT's clean-up applies to it), with [CLS] / [SEP] specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)  # the clean-up is left to transformers
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"],
                                        show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", clean_up_tokenization_spaces=True)


def test_clean_up_of_spaces_on_wordpiece():
    tokenizer = wordpiece_tokenizer()
    ids = tokenizer.encode("The capital of France is Paris. Once upon a time, there was.",
                           add_special_tokens=True)
    decode = text_decoder(tokenizer)
    assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    raw = tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=True)
    assert " ." in raw and decode(ids) != raw  # the clean-up ran, as transformers' does
    assert_same_as_transformers(tokenizer)


def test_a_tokenizer_with_its_own_decode_is_called_as_it_is(tiny):
    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super()._decode(token_ids, skip_special_tokens, **kwargs).upper()

    shouting = Shouting(tokenizer_object=tiny.backend_tokenizer)
    assert text_decoder(shouting)(tiny.encode("Paris")) == "PARIS"

    class Plain:  # not a transformers tokenizer at all
        def decode(self, ids, skip_special_tokens=False):
            return f"{len(ids)} {skip_special_tokens}"

    assert text_decoder(Plain())([1, 2]) == "2 True"


@pytest.mark.parametrize("stop", [[], ["ital of F", "🙂 日"], ["s", "é 🙂"]])
def test_incremental_deltas_are_those_over_transformers_decode(tiny, stop):
    rng = random.Random(1)
    text_ids = tiny.encode(TEXT)
    sequences = [text_ids, *([rng.randrange(len(tiny)) for _ in range(40)] for _ in range(30))]
    slow = functools.partial(tiny.decode, skip_special_tokens=True)
    for ids in sequences:
        runs = []
        for decode in (None, slow):
            detok = TextStream(tiny, tiny.encode("Hello"),
                               SamplingParams(max_tokens=100, stop=stop), [], decode=decode)
            deltas = []
            for token in ids:
                if detok.append(token) is not None:
                    break
                deltas.append(detok.pop_delta())
            else:
                detok.finish(FinishReason.LENGTH)
            deltas.append(detok.pop_delta())
            runs.append((deltas, detok.text, detok.finish_reason))
        assert runs[0] == runs[1]
        assert "".join(runs[0][0]) == runs[0][1]
