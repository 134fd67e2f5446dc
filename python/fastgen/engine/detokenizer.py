"""Turns a sequence's tokens into text as they are generated, and decides when it stops.

Incremental decoding follows vLLM's offsets scheme: each step decodes a short window of recent
tokens twice (ending before and after the new ones) and emits the difference. Decoding from a few
tokens of context, never from the start, keeps the cost per token constant and lets tokenizers
that drop a leading space at the start of a text (SentencePiece) place it right.

Text never ends in a broken UTF-8 character: while the window decodes to something ending in the
replacement character U+FFFD (a multi-byte character split across tokens), the new tokens are held
back until a later token completes it.

Stopping, checked after every token, in order: a stop string (the output text is cut where it
starts; it may span tokens), EOS (unless ignore_eos) or a stop token id, then max_tokens. Streamed
text also holds back any tail that could be the start of a stop string, so nothing streamed is ever
taken back.

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

from fastgen.config import SamplingParams
from fastgen.engine.sequence import FinishReason

# Tokens of context decoded before the new ones (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_CONTEXT_TOKENS = 5
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
    """One request's output text. Feed it every token id with `append`; read `text` (all of it,
    stop string removed) or `pop_delta()` (what is safe to stream since the last call)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int], max_tokens: int | None = None,
                 decode: Decode | None = None):
        """decode: text_decoder(tokenizer), when the caller made it already (the engine makes
        one for all its requests)."""
        self.tokenizer = tokenizer
        self._decode = decode if decode is not None else text_decoder(tokenizer)
        self.params = params
        self.max_tokens = params.max_tokens if max_tokens is None else max_tokens
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_ids.update(eos_token_ids)
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        self._token_ids = list(prompt_token_ids)
        self._num_prompt_tokens = len(prompt_token_ids)
        self._prefix_offset = max(len(prompt_token_ids) - _CONTEXT_TOKENS, 0)
        self._read_offset = len(prompt_token_ids)
        self._prefix_text: str | None = None  # the window before the read offset, decoded
        self.text = ""
        self._num_streamed = 0  # characters of text already handed out by pop_delta
        self.finish_reason: FinishReason | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self._token_ids) - self._num_prompt_tokens

    def append(self, token_id: int) -> FinishReason | None:
        """Adds one generated token; returns why the request stops now, or None to go on."""
        if self.finish_reason is not None:
            raise RuntimeError("token appended to a finished request")
        self._token_ids.append(token_id)
        if token_id in self._stop_ids:
            # EOS and stop ids end the request without adding their text (vLLM's default).
            self.finish_reason = FinishReason.STOP
            self._flush()
            return self.finish_reason
        new_text = self._decode_new()
        if new_text:
            old_len = len(self.text)
            self.text += new_text
            if self._max_stop_len and self._cut_at_stop_string(old_len):
                self.finish_reason = FinishReason.STOP
                return self.finish_reason
        if len(self._token_ids) - self._num_prompt_tokens >= self.max_tokens:
            self.finish_reason = FinishReason.LENGTH
            self._flush()
        return self.finish_reason

    def finish(self, reason: FinishReason) -> None:
        """Ends the request from outside (the context is full); held-back text is released."""
        self.finish_reason = reason
        self._flush()

    def pop_delta(self) -> str:
        """Text added since the last call that can no longer change."""
        stable = len(self.text)
        if self.finish_reason is None and self._max_stop_len:
            stable -= self._partial_stop_len()
        delta = self.text[self._num_streamed: stable]
        self._num_streamed = max(self._num_streamed, stable)
        return delta

    def _decode_new(self) -> str:
        token_ids = self._token_ids
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

    def _flush(self) -> None:
        """Decodes tokens still held back (at the end, even an incomplete character)."""
        if self._read_offset < len(self._token_ids):
            prefix = self._decode(self._token_ids[self._prefix_offset: self._read_offset])
            end = len(self._token_ids)
            if self.finish_reason is FinishReason.STOP and self._token_ids[-1] in self._stop_ids:
                end -= 1  # the stop token itself adds no text
            full = self._decode(self._token_ids[self._prefix_offset: end])
            self.text += full[len(prefix):]
            self._read_offset = len(self._token_ids)
            self._prefix_text = None

    def _cut_at_stop_string(self, old_len: int) -> bool:
        # A stop string ending in the new text starts at most max_stop_len - 1 characters earlier.
        search_from = max(old_len - self._max_stop_len + 1, 0)
        hits = [i for i in (self.text.find(s, search_from) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.params.stop:
            for length in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
