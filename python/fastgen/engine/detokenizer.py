"""Turns a sequence's tokens into text as they are generated, and finds its stop strings.

Incremental decoding follows vLLM's offsets scheme: each step decodes a short window of recent
tokens twice (ending before and after the new ones) and emits the difference. Decoding from a few
tokens of context, never from the start, keeps the cost per token constant and lets tokenizers
that drop a leading space at the start of a text (SentencePiece) place it right.

Text never ends in a broken UTF-8 character: while the window decodes to something ending in the
replacement character U+FFFD (a multi-byte character split across tokens), the new tokens are held
back until a later token completes it.

The detokenizer reads the token ids from the sequence (it keeps only offsets into them) and knows
nothing of stop token ids or max_tokens, which the scheduler checks (scheduler.stop_reason); it is
told when the new token stopped the sequence or the sequence finished, so that the stop token's
text is left out and held-back text is released. A stop string (the output text is cut where it
starts; it may span tokens) is checked after every token, before the scheduler's LENGTH applies.
Streamed text also holds back any tail that could be the start of a stop string, so nothing
streamed is ever taken back.

The windows are decoded by the Rust tokenizer behind a transformers fast tokenizer, called
directly (text_decoder): transformers' decode wraps that one call in argument conversion and
dispatch that cost twice the decode itself, for every token of every sequence. The prefix
window's text is kept while the offsets stay put (a character still incomplete), so such a step
decodes once. Decoding all of a step's windows in one `decode_batch` call was measured no faster
(its thread pool costs what the calls save), so each sequence decodes its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from fastgen.tokenization import CONTEXT_TOKENS


_REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[list[int]], str]  # token ids -> text, special tokens skipped


def text_decoder(tokenizer) -> Decode:
    """`tokenizer.decode(ids, skip_special_tokens=True)` as a function, without transformers'
    per-call overhead where that changes nothing: for a fast tokenizer that keeps transformers'
    own decode, its Rust backend's decode, followed by the clean-up of tokenization spaces when
    transformers would apply it. Any other tokenizer (a slow one, one with its own decode) is
    called as it is."""
    from transformers import PreTrainedTokenizerFast

    cls = type(tokenizer)
    if not (isinstance(tokenizer, PreTrainedTokenizerFast)
            and cls.decode is PreTrainedTokenizerFast.decode
            and cls._decode is PreTrainedTokenizerFast._decode):
        return functools.partial(tokenizer.decode, skip_special_tokens=True)
    backend_decode = tokenizer.backend_tokenizer.decode
    if not _cleans_up_spaces(tokenizer):
        return lambda ids: backend_decode(ids, skip_special_tokens=True)
    clean_up = tokenizer.clean_up_tokenization
    return lambda ids: clean_up(backend_decode(ids, skip_special_tokens=True))


def _cleans_up_spaces(tokenizer) -> bool:
    """Whether a fast tokenizer's decode runs clean_up_tokenization on the backend's text (see
    PreTrainedTokenizerFast._decode): when clean_up_tokenization_spaces is set, except, from
    transformers 5 on (which added the override flag), for a BPE model unless that flag is set."""
    if not tokenizer.clean_up_tokenization_spaces:
        return False
    force_for_bpe = getattr(
        tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None)
    if force_for_bpe is None:  # transformers 4: always
        return True
    return force_for_bpe or type(tokenizer.backend_tokenizer.model).__name__ != "BPE"


class IncrementalDetokenizer:
    """One sequence's output text. After each token is appended to the sequence's token ids, call
    `step(token_ids, ...)`; read `text` (all of it, stop string removed) or `pop_delta()` (what
    is safe to stream since the last call)."""

    def __init__(self, tokenizer, num_prompt_tokens: int, stop: list[str],
                 decode: Decode | None = None):
        """decode: text_decoder(tokenizer), when the caller made it already (the engine makes
        one for all its requests)."""
        self._decode = decode if decode is not None else text_decoder(tokenizer)
        self.stop = list(stop)
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self._prefix_offset = max(num_prompt_tokens - CONTEXT_TOKENS, 0)
        self._read_offset = num_prompt_tokens
        self._prefix_text: str | None = None  # the window before the read offset, decoded
        self.text = ""
        self._num_streamed = 0  # characters of text already handed out by pop_delta
        self.finished = False

    def step(self, token_ids: list[int], stopped_by_token: bool = False,
             finishing: bool = False) -> bool:
        """Takes the sequence's newest token (token_ids[-1]). stopped_by_token: it is a stop
        token id, whose text is left out; finishing: the sequence ends with it (held-back text
        is released). Returns True when a stop string ended the text here (the sequence stops)."""
        if self.finished:
            raise RuntimeError("token appended to a finished sequence")
        if stopped_by_token:
            self.finish(token_ids, drop_last=True)
            return False
        new_text = self._decode_new(token_ids)
        if new_text:
            old_len = len(self.text)
            self.text += new_text
            if self._max_stop_len and self._cut_at_stop_string(old_len):
                self.finished = True
                return True
        if finishing:
            self.finish(token_ids)
        return False

    def finish(self, token_ids: list[int], drop_last: bool = False) -> None:
        """Ends the text (max_tokens, a full context, an abort): tokens still held back are
        decoded, even an incomplete character; drop_last leaves the last token's text out."""
        self.finished = True
        end = len(token_ids) - (1 if drop_last else 0)
        if self._read_offset < end:
            prefix = self._decode(token_ids[self._prefix_offset: self._read_offset])
            full = self._decode(token_ids[self._prefix_offset: end])
            self.text += full[len(prefix):]
        self._read_offset = len(token_ids)
        self._prefix_text = None

    def pop_delta(self) -> str:
        """Text added since the last call that can no longer change."""
        stable = len(self.text)
        if not self.finished and self._max_stop_len:
            stable -= self._partial_stop_len()
        delta = self.text[self._num_streamed: stable]
        self._num_streamed = max(self._num_streamed, stable)
        return delta

    def _decode_new(self, token_ids: list[int]) -> str:
        prefix = self._prefix_text
        if prefix is None:
            prefix = self._prefix_text = self._decode(
                token_ids[self._prefix_offset: self._read_offset])
        full = self._decode(token_ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still incomplete: wait for more tokens
        self._prefix_offset = self._read_offset
        self._read_offset = len(token_ids)
        self._prefix_text = None
        return full[len(prefix):]

    def _cut_at_stop_string(self, old_len: int) -> bool:
        # A stop string ending in the new text starts at most max_stop_len - 1 characters earlier.
        search_from = max(old_len - self._max_stop_len + 1, 0)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
