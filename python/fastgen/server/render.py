"""How the OpenAI routes write an answer from a Generation's outputs: one JSON body, or a stream of
server-sent events.

- Whole: each choice rendered once from its prompt's final output, plus the usage.
- Streamed: `data: {chunk}\\n\\n` events, ending with `data: [DONE]\\n\\n`. Each sample's `delta`
  (text that can no longer change) goes out as soon as a step produces it, with the logprobs of
  its new tokens; its finish_reason goes out once. The response closes the generation however it
  ends, so a client that hangs up mid-stream frees its KV blocks at once. An engine error after
  the 200 went out is sent as an error event.

A choice index is prompt index * n + sample index. The renderers (`Choices`: CompletionChoices,
ChatChoices) hold only what the request fixed (the tokenizer, echo, how many logprobs) and turn a
`Piece`, what one choice has new, into a JSON choice: rendering a piece twice gives the same
choice. What a streamed choice carries from one piece to the next (whether its finish reason went
out, whether echo has put the prompt before it, where its logprobs' text offsets are) is a
`ChoiceState`, which a renderer takes and hands back updated; the stream keeps one per choice.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import ClassVar

from fastapi.responses import StreamingResponse

from fastgen.outputs import CompletionOutput, Logprobs, RequestOutput
from fastgen.server.errors import error_body
from fastgen.server.generation import Generation, Prompt
from fastgen.server.tools import ToolParser, ToolUse
from fastgen.tokenization import TokenText

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps to the same value


@dataclass(frozen=True)
class Piece:
    """What one choice has new since its last piece (a whole sample, for a whole answer)."""

    index: int                      # choice index: prompt index * n + sample index
    text: str
    token_ids: list[int]
    logprobs: list[Logprobs] | None  # one per token of token_ids, when asked for
    finish_reason: str | None       # set on the choice's last piece only
    prompt_logprobs: list[Logprobs | None] | None  # the request's, when asked for (echo)


@dataclass(frozen=True)
class ChoiceState:
    """What has gone out of one choice so far; a whole choice is rendered from a fresh one."""

    started: bool = False   # a piece went out (echo puts the prompt before the first only)
    ended: bool = False     # its finish reason went out: nothing more follows
    text_offset: int = 0    # completions' logprobs: characters of token text before the next
    text: str = ""          # chat with tools: the choice's text so far
    sent: int = 0           # chat with tools: how much of it went out as content

    def after(self, piece: Piece, text_offset: int | None = None, text: str = "",
              sent: int = 0) -> ChoiceState:
        """The state once `piece` has gone out (text_offset: where the next token's text
        starts, when the piece moved it; text, sent: a chat choice with tools)."""
        return ChoiceState(True, piece.finish_reason is not None,
                           self.text_offset if text_offset is None else text_offset, text, sent)


def stream_pieces(index: int, out: RequestOutput, n: int,
                  states: list[ChoiceState]) -> Iterator[Piece]:
    """What each sample of prompt `index` has new in the DELTA output `out`: none for a sample
    that did not advance or whose finish reason went out already (states: per choice)."""
    for sample in out.outputs:
        choice = index * n + sample.index
        if states[choice].ended:
            continue
        token_ids, logprobs = sample.token_ids, sample.logprobs
        # Tokens whose text is held back (part of a character or of a stop string) are worth a
        # piece only for their logprobs.
        if not (sample.delta or sample.finished or (logprobs and token_ids)):
            continue
        reason = sample.finish_reason.value if sample.finished else None
        yield Piece(choice, sample.delta, token_ids, logprobs, reason, out.prompt_logprobs)


def whole_pieces(finals: list[RequestOutput], n: int) -> list[Piece]:
    """Every choice whole, in index order, from each prompt's final output."""
    return [Piece(i * n + s.index, s.text, s.token_ids, s.logprobs, s.finish_reason.value,
                  out.prompt_logprobs)
            for i, out in enumerate(finals) for s in out.outputs]


def keep_best(out: RequestOutput, n: int, keep_logprobs: bool) -> RequestOutput:
    """The n samples of out with the highest cumulative logprob (the sum over their tokens of
    the sampled token's logprob), most likely first, numbered 0 .. n - 1; without their
    logprobs unless keep_logprobs."""
    def score(sample: CompletionOutput) -> float:
        return sum(entry[t] for t, entry in zip(sample.token_ids, sample.logprobs or ()))

    best = sorted(out.outputs, key=score, reverse=True)[:n]
    kept = [replace(s, index=i, logprobs=s.logprobs if keep_logprobs else None)
            for i, s in enumerate(best)]
    return replace(out, outputs=kept)


def usage(generation: Generation) -> dict[str, int]:
    """Prompt tokens once per prompt, completion tokens summed over every choice."""
    prompt, completion = generation.num_prompt_tokens, generation.num_output_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


# The renderers.

class Choices(ABC):
    """Renders the choices of one answer. id_prefix, kind and chunk_kind name the answer
    (`{id_prefix}-<hex>`, its `object` whole and streamed)."""

    id_prefix: ClassVar[str]
    kind: ClassVar[str]
    chunk_kind: ClassVar[str]

    def __init__(self, tokenizer, n: int):
        self.n = n  # samples per prompt
        self._tokens = TokenText(tokenizer)

    def opening(self) -> list[dict]:
        """The choices a stream sends before any output (none unless a route has some)."""
        return []

    @abstractmethod
    def whole(self, piece: Piece) -> dict:
        """A whole choice, for an answer sent as one body."""

    @abstractmethod
    def chunk(self, piece: Piece, state: ChoiceState) -> tuple[dict, ChoiceState]:
        """A streamed piece of a choice, given what went out of it before; and the state after
        it."""


class CompletionChoices(Choices):
    """Choices of /v1/completions: {index, text, logprobs, finish_reason}, logprobs in OpenAI's
    legacy shape {tokens, token_logprobs, top_logprobs, text_offset}. With echo, a choice's first
    piece starts with its prompt (and, with logprobs, the prompt's logprobs; the first prompt
    token has none). A streamed piece has the same shape as a whole choice."""

    id_prefix, kind, chunk_kind = "cmpl", "text_completion", "text_completion"

    def __init__(self, tokenizer, prompts: list[Prompt], n: int, echo: bool,
                 num_logprobs: int | None):
        super().__init__(tokenizer, n)
        self._prompts = prompts
        self._echo = echo
        self._num_logprobs = num_logprobs

    def whole(self, piece: Piece) -> dict:
        return self.chunk(piece, ChoiceState())[0]

    def chunk(self, piece: Piece, state: ChoiceState) -> tuple[dict, ChoiceState]:
        text, token_ids, logprobs = piece.text, piece.token_ids, piece.logprobs
        if self._echo and not state.started:
            prompt = self._prompts[piece.index // self.n]
            prompt_text = prompt.text
            if prompt_text is None:
                prompt_text = self._tokens.tokenizer.decode(prompt.token_ids)
            text = prompt_text + text
            token_ids = prompt.token_ids + token_ids
            if logprobs is not None:
                logprobs = list(piece.prompt_logprobs) + logprobs
        rendered, text_offset = None, state.text_offset
        if logprobs is not None:
            rendered, text_offset = self._logprobs(token_ids, logprobs, text_offset)
        return ({"index": piece.index, "text": text, "logprobs": rendered,
                 "finish_reason": piece.finish_reason}, state.after(piece, text_offset))

    def _logprobs(self, token_ids: list[int], entries: list[Logprobs | None],
                  text_offset: int) -> tuple[dict, int]:
        """The legacy logprobs of these tokens, the first starting at character text_offset;
        and where the next token's text starts."""
        strings = self._tokens.strings(token_ids)
        offsets = []
        for string in strings:
            offsets.append(text_offset)
            text_offset += len(string)
        top = []
        for entry in entries:
            if entry is None:
                top.append(None)
                continue
            # Keyed by text, so tokens that read the same (say, two pieces of characters, both
            # shown as U+FFFD) share a key: it keeps the likeliest.
            alternatives: dict[str, float] = {}
            for token_id, value in _top(entry, self._num_logprobs):
                alternatives.setdefault(self._tokens.string(token_id), _clamp(value))
            top.append(alternatives)
        return {"tokens": strings,
                "token_logprobs": [None if e is None else _clamp(e[t])
                                   for t, e in zip(token_ids, entries)],
                "top_logprobs": top, "text_offset": offsets}, text_offset


class ChatChoices(Choices):
    """Choices of /v1/chat/completions: `message` when whole, `delta` when streamed (after an
    opening chunk per choice with the role); logprobs as
    {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}. With tools
    (server/tools.py), a choice's calls are taken out of its text: `message.tool_calls` and
    finish_reason "tool_calls"; streamed, content goes out as far as it cannot begin a call, and
    the calls go out whole with the choice's last piece."""

    id_prefix, kind, chunk_kind = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer, n: int, num_top: int, tools: ToolUse | None = None,
                 parser: ToolParser | None = None):
        super().__init__(tokenizer, n)
        self._num_top = num_top
        self._tools = tools
        self._parser = parser

    def opening(self) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(self.n)]

    def whole(self, piece: Piece) -> dict:
        message, reason = {"role": "assistant", "content": piece.text}, piece.finish_reason
        if self._tools is not None:
            content, calls = self._tools.parse(piece.text, self._parser)
            if calls:
                message = {"role": "assistant", "content": content,
                           "tool_calls": [call.as_openai() for call in calls]}
                reason = "tool_calls"
        return {"index": piece.index, "message": message, "logprobs": self._logprobs(piece),
                "finish_reason": reason}

    def chunk(self, piece: Piece, state: ChoiceState) -> tuple[dict, ChoiceState]:
        if self._tools is None:
            return ({"index": piece.index,
                     "delta": {"content": piece.text} if piece.text else {},
                     "logprobs": self._logprobs(piece), "finish_reason": piece.finish_reason},
                    state.after(piece))
        text, reason, delta = state.text + piece.text, piece.finish_reason, {}
        if reason is None:
            sent = max(state.sent, len(text) - self._tools.holds_back(text, self._parser))
            if sent > state.sent:
                delta["content"] = text[state.sent:sent]
        else:
            sent = len(text)
            content, calls = self._tools.parse(text, self._parser)
            if calls:
                already = text[:state.sent]
                rest = content[len(already):] if content and content.startswith(already) else ""
                if rest:
                    delta["content"] = rest
                delta["tool_calls"] = [call.as_openai(i) for i, call in enumerate(calls)]
                reason = "tool_calls"
            elif len(text) > state.sent:
                delta["content"] = text[state.sent:]
        return ({"index": piece.index, "delta": delta, "logprobs": self._logprobs(piece),
                 "finish_reason": reason}, state.after(piece, text=text, sent=sent))

    def _logprobs(self, piece: Piece) -> dict | None:
        if piece.logprobs is None:
            return None
        content = []
        for token_id, entry in zip(piece.token_ids, piece.logprobs):
            item = self._token(token_id, entry[token_id])
            item["top_logprobs"] = [self._token(t, v) for t, v in _top(entry, self._num_top)]
            content.append(item)
        return {"content": content}

    def _token(self, token_id: int, logprob: float) -> dict:
        raw = self._tokens.bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _clamp(logprob),
                "bytes": list(raw)}


def _top(entry: Logprobs, n: int) -> list[tuple[int, float]]:
    """The n most likely of an entry: its first n items (see fastgen.outputs.Logprobs)."""
    return list(entry.items())[:n]


def _clamp(logprob: float) -> float:
    # Not max(): max(nan, floor) is nan; this maps NaN to the floor too.
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB  # noqa: FURB136


# The answer, whole or streamed.

def whole_answer(generation: Generation, head: dict, choices: Choices) -> dict:
    """The body of a finished generation's answer; head: id, object, created, model."""
    return {**head, "choices": [choices.whole(p)
                                for p in whole_pieces(generation.finals, choices.n)],
            "usage": usage(generation)}


class EventStream(StreamingResponse):
    """text/event-stream that closes its generation however the response ends: finished,
    failed, or cancelled by Starlette because the client disconnected."""

    def __init__(self, events: AsyncIterator[str], generation: Generation):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.close()


def event_stream(generation: Generation, head: dict, choices: Choices,
                 include_usage: bool) -> EventStream:
    """The streamed answer; head: id, object (the chunk's), created, model."""
    async def events() -> AsyncIterator[str]:
        states = [ChoiceState()] * (len(generation.prompts) * choices.n)
        try:
            for choice in choices.opening():
                yield sse({**head, "choices": [choice]})
            async for index, out in generation.outputs():
                for piece in stream_pieces(index, out, choices.n, states):
                    choice, states[piece.index] = choices.chunk(piece, states[piece.index])
                    yield sse({**head, "choices": [choice]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(generation)})
        except ValueError as error:  # refused by the engine after all: the status is sent
            yield sse(error_body(400, str(error)))
        except Exception as error:  # noqa: BLE001  (a failed engine step)
            yield sse(error_body(500, f"internal error: {type(error).__name__}: {error}"))
        finally:
            generation.close()
        yield "data: [DONE]\n\n"

    return EventStream(events(), generation)


def sse(data: dict) -> str:
    """One server-sent event holding data as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
