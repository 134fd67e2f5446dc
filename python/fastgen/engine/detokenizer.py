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
"""

from __future__ import annotations

from fastgen.config import SamplingParams
from fastgen.engine.sequence import FinishReason

# Tokens of context decoded before the new ones (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """One request's output text. Feed it every token id with `append`; read `text` (all of it,
    stop string removed) or `pop_delta()` (what is safe to stream since the last call)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int], max_tokens: int | None = None):
        self.tokenizer = tokenizer
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
        old_len = len(self.text)
        self.text += self._decode_new()
        if self._max_stop_len and self._cut_at_stop_string(old_len):
            self.finish_reason = FinishReason.STOP
        elif self.num_output_tokens >= self.max_tokens:
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
        if self.finish_reason is None:
            stable -= self._partial_stop_len()
        delta = self.text[self._num_streamed: stable]
        self._num_streamed = max(self._num_streamed, stable)
        return delta

    def _decode_new(self) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self._token_ids[self._prefix_offset: self._read_offset],
                        skip_special_tokens=True)
        full = decode(self._token_ids[self._prefix_offset:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still incomplete: wait for more tokens
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return full[len(prefix):]

    def _flush(self) -> None:
        """Decodes tokens still held back (at the end, even an incomplete character)."""
        if self._read_offset < len(self._token_ids):
            decode = self.tokenizer.decode
            prefix = decode(self._token_ids[self._prefix_offset: self._read_offset],
                            skip_special_tokens=True)
            end = len(self._token_ids)
            if self.finish_reason is FinishReason.STOP and self._token_ids[-1] in self._stop_ids:
                end -= 1  # the stop token itself adds no text
            full = decode(self._token_ids[self._prefix_offset: end], skip_special_tokens=True)
            self.text += full[len(prefix):]
            self._read_offset = len(self._token_ids)

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
