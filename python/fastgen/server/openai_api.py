"""POST /v1/completions and POST /v1/chat/completions, answered as OpenAI (and vLLM) answer them.

A request becomes one engine request per prompt (a completions `prompt` may be a list; a chat
has one conversation), each with n samples: choice index = prompt index * n + sample index. The
engine requests run as one `_Generation`: their outputs merged into one async stream, each timed
for the metrics, all cancelled by `close()`. The engine sends DELTA outputs (what is new at each
step), streaming or not; the generation adds them up into each prompt's final output.

- Non-streaming: the final outputs become one JSON body. Meanwhile a task waits for the
  client's disconnect message and cancels the generation if it comes first (uvicorn never
  cancels a handler whose client left).
- Streaming: server-sent events, `data: {chunk}\\n\\n`, ending with `data: [DONE]\\n\\n`. Each
  sample's `delta` (text that can no longer change) goes out as soon as a step produces it, with
  the logprobs of its new tokens; its finish_reason goes out once. The response closes the
  generation however it ends, so a client that hangs up mid-stream frees its KV blocks at once.

Everything a client can get wrong is checked before anything is queued: the model name, the
prompt (empty, longer than the context, token ids outside the vocabulary), max_tokens against the
context, the sampling values, n. Each is a 400 in OpenAI's error JSON (raised here as APIError or
ValueError, or a pydantic error, and rendered by the app's handlers); a full queue is a 503.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from fastgen.config import SamplingParams
from fastgen.engine.async_engine import AsyncLLMEngine, RequestStream
from fastgen.outputs import Logprobs, RequestOutput, RequestOutputKind
from fastgen.server.errors import APIError, error_body
from fastgen.server.metrics import RequestMetrics
from fastgen.server.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
)

router = APIRouter()

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps to the same value


@router.post("/v1/completions")
async def create_completion(request: Request):
    arrival = time.monotonic()
    body: CompletionRequest = await _accept(request, CompletionRequest)
    engine: AsyncLLMEngine = request.app.state.engine
    tokenizer = engine.tokenizer
    prompts = [_Prompt(p, tokenizer.encode(p)) if isinstance(p, str) else _Prompt(None, p)
               for p in body.prompts()]
    max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    # echo with logprobs shows the prompt's logprobs too (how clients score a text).
    params = body.sampling_params(max_tokens, body.logprobs,
                                  body.logprobs if body.echo else None)
    for i, prompt in enumerate(prompts):
        _check_prompt(engine, prompt.token_ids, params,
                      "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    generation = _Generation(request, "completions", prompts, params, arrival)
    choices = _CompletionChoices(tokenizer, prompts, params.n, body.echo, body.logprobs)
    return await _answer(request, body, generation, choices)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request):
    arrival = time.monotonic()
    body: ChatCompletionRequest = await _accept(request, ChatCompletionRequest)
    engine: AsyncLLMEngine = request.app.state.engine
    token_ids = _apply_chat_template(engine.tokenizer, body.conversation())
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        max_tokens = _room(engine, len(token_ids))
    elif max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    params = body.sampling_params(max_tokens, body.num_logprobs)
    _check_prompt(engine, token_ids, params, "messages")
    generation = _Generation(request, "chat_completions", [_Prompt(None, token_ids)], params,
                             arrival)
    return await _answer(request, body, generation,
                         _ChatChoices(engine.tokenizer, params.n, body.top_logprobs or 0))


async def _answer(request: Request, body, generation: _Generation, choices) -> Response:
    """The answer, streamed or whole; `choices` (_CompletionChoices or _ChatChoices) renders
    its parts."""
    head = {"id": f"{choices.id_prefix}-{uuid.uuid4().hex}", "object": choices.kind,
            "created": int(time.time()), "model": request.app.state.model_name}
    if body.stream:
        return _event_stream(generation, {**head, "object": choices.chunk_kind}, choices,
                             body.include_usage)
    if not await _collect(generation, request):
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse({**head, "choices": [choices.whole(p) for p in generation.results()],
                         "usage": generation.usage()})


# Checks, before anything is queued.

async def _accept(request: Request, model: type[BaseModel]):
    """The body as `model` (whatever its Content-Type), for the served model and with no
    unsupported field; a 400 (404 for another model) otherwise."""
    body = await _parse(request, model)
    served = request.app.state.model_name
    if body.model is not None and body.model != served:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                            f"{served!r}", "model")
    body.check_supported()
    return body


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


def _check_prompt(engine: AsyncLLMEngine, token_ids: list[int], params: SamplingParams,
                  where: str) -> None:
    """400 for an empty prompt, token ids outside the vocabulary, or a prompt and max_tokens
    that do not fit the context; then the engine's own checks (ValueError: the KV cache)."""
    llm_engine = engine.engine
    if not token_ids:
        raise APIError(400, f"{where} is empty", where)
    vocab_size = llm_engine.loaded.hf_config.vocab_size
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{where}: token id {bad} is outside the vocabulary "
                            f"(0 to {vocab_size - 1})", where)
    context = llm_engine.max_model_len
    num_prompt, max_tokens = len(token_ids), params.max_tokens
    if num_prompt + max_tokens > context:
        if num_prompt >= context:
            raise APIError(400, f"this model's maximum context length is {context} tokens, but "
                                f"the {where} has {num_prompt} tokens; shorten it", where)
        raise APIError(400, f"this model's maximum context length is {context} tokens, but "
                            f"{num_prompt + max_tokens} were requested ({num_prompt} in the "
                            f"{where}, {max_tokens} to generate); lower max_tokens (at most "
                            f"{context - num_prompt} here) or shorten the {where}", "max_tokens")
    llm_engine.check_request(num_prompt, params)


def _room(engine: AsyncLLMEngine, num_prompt_tokens: int) -> int:
    """The most tokens a prompt of this length can be given: what both the context and the
    whole KV cache leave after it (at least 1, so a too-long prompt is refused for its length)."""
    llm_engine = engine.engine
    blocks = llm_engine.block_manager
    capacity = min(llm_engine.max_model_len, blocks.num_blocks * blocks.block_size)
    return max(capacity - num_prompt_tokens, 1)


def _apply_chat_template(tokenizer, conversation: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model has no chat template; use /v1/completions")
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as error:  # noqa: BLE001  (jinja's TemplateError, or a template's raise)
        raise APIError(400, f"the chat template refused these messages: {error}",
                       "messages") from None
    # The template already wrote the special tokens (BOS, ...): do not add them again.
    return tokenizer.encode(text, add_special_tokens=False)


# Running: one API request's engine requests.

@dataclass
class _Prompt:
    text: str | None  # as the client sent it; None when sent as token ids
    token_ids: list[int]


@dataclass
class _Piece:
    """What one choice has new since the last piece (a whole sample, for a final answer)."""

    index: int                      # choice index: prompt index * n + sample index
    prompt_index: int
    text: str
    token_ids: list[int]
    logprobs: list[Logprobs] | None  # one per token of token_ids, when asked for
    finish_reason: str | None       # set on the choice's last piece only
    prompt_logprobs: list[Logprobs | None] | None  # the request's, when asked for


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected."""


class _Generation:
    """An API request's engine requests (one per prompt), their outputs merged into one async
    stream, each timed for the metrics. `close()` cancels those not finished; it is idempotent
    and every path out of a handler ends in it."""

    def __init__(self, request: Request, endpoint: str, prompts: list[_Prompt],
                 params: SamplingParams, arrival: float):
        state = request.app.state
        self.prompts = prompts
        self.n = params.n
        # Per prompt, its DELTA outputs so far added up (whole once finished).
        self.finals: list[RequestOutput | None] = [None] * len(prompts)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._streams: list[RequestStream] = []
        self._timers: list[RequestMetrics] = []
        self._pumps: list[asyncio.Task] = []
        self._ended = [False] * (len(prompts) * self.n)  # per choice
        try:
            for prompt in prompts:  # all or none: a refusal cancels those already queued
                self._streams.append(state.engine.add_request(
                    prompt.token_ids, params, prompt.text, RequestOutputKind.DELTA))
        except BaseException:
            self.close()
            raise
        self._timers = [state.metrics.request(endpoint, arrival, len(p.token_ids))
                        for p in prompts]
        self._pumps = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self._streams)]

    async def _pump(self, index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((index, out))
        except Exception as error:  # noqa: BLE001  (handed to the consumer, raised there)
            self._queue.put_nowait((index, error))

    def client_gone(self) -> None:
        self._queue.put_nowait((None, _ClientGone()))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, DELTA output) as the engine produces them, until every request
        finished. Raises an engine error (ValueError, ...) or _ClientGone."""
        remaining = len(self._streams)
        while remaining:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self._timers[index].observe(item)
            final = self.finals[index]
            self.finals[index] = (RequestOutput.accumulate(item) if final is None
                                  else final.add(item))
            if item.finished:
                remaining -= 1
            yield index, item

    def pieces(self, index: int, out: RequestOutput) -> Iterator[_Piece]:
        """What each sample of prompt `index` has new in the DELTA output `out` (none for a
        sample that did not advance); a sample's finish reason comes once, on its last piece."""
        for sample in out.outputs:
            choice = index * self.n + sample.index
            if self._ended[choice]:
                continue
            self._ended[choice] = sample.finished
            token_ids, logprobs = sample.token_ids, sample.logprobs
            # Tokens whose text is held back (part of a character or of a stop string) are
            # worth a piece only for their logprobs.
            if not (sample.delta or sample.finished or (logprobs and token_ids)):
                continue
            reason = sample.finish_reason.value if sample.finished else None
            yield _Piece(choice, index, sample.delta, token_ids, logprobs, reason,
                         out.prompt_logprobs)

    def results(self) -> list[_Piece]:
        """Every choice whole, in index order (once all finished)."""
        return [_Piece(i * self.n + s.index, i, s.text, s.token_ids, s.logprobs,
                       s.finish_reason.value, out.prompt_logprobs)
                for i, out in enumerate(self.finals) for s in out.outputs]

    def usage(self) -> dict[str, int]:
        """Prompt tokens once per prompt, completion tokens summed over every choice."""
        prompt = sum(len(p.token_ids) for p in self.prompts)
        completion = sum(len(s.token_ids) for out in self.finals if out is not None
                         for s in out.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def close(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        for stream in self._streams:
            stream.abort()  # a no-op once finished
        for timer in self._timers:
            timer.abort()


async def _collect(generation: _Generation, request: Request) -> bool:
    """Runs a non-streaming generation to its end: True, or False when the client left first
    (its requests are then cancelled)."""
    watcher = asyncio.create_task(_watch_disconnect(generation, request))
    try:
        async for _ in generation.outputs():
            pass
        return True
    except _ClientGone:
        return False
    finally:
        watcher.cancel()
        generation.close()


async def _watch_disconnect(generation: _Generation, request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect: waiting
    # for it costs nothing, unlike polling request.is_disconnected().
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.client_gone()


class _EventStream(StreamingResponse):
    """text/event-stream that closes its generation however the response ends: finished,
    failed, or cancelled by Starlette because the client disconnected."""

    def __init__(self, events: AsyncIterator[str], generation: _Generation):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.close()


def _event_stream(generation: _Generation, head: dict, choices,
                  include_usage: bool) -> _EventStream:
    async def events() -> AsyncIterator[str]:
        try:
            for choice in choices.opening():
                yield _sse({**head, "choices": [choice]})
            async for index, out in generation.outputs():
                for piece in generation.pieces(index, out):
                    yield _sse({**head, "choices": [choices.piece(piece)]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": generation.usage()})
        except ValueError as error:  # refused by the engine after all: the status is sent
            yield _sse(error_body(400, str(error)))
        except Exception as error:  # noqa: BLE001  (a failed engine step)
            yield _sse(error_body(500, f"internal error: {type(error).__name__}: {error}"))
        finally:
            generation.close()
        yield "data: [DONE]\n\n"

    return _EventStream(events(), generation)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# Rendering choices.

class _CompletionChoices:
    """Choices of /v1/completions: {index, text, logprobs, finish_reason}, logprobs in OpenAI's
    legacy shape {tokens, token_logprobs, top_logprobs, text_offset}. With echo, a choice's first
    piece starts with its prompt (and, with logprobs, the prompt's logprobs; the first prompt
    token has none). A streamed piece has the same shape as a whole choice."""

    id_prefix, kind, chunk_kind = "cmpl", "text_completion", "text_completion"

    def __init__(self, tokenizer, prompts: list[_Prompt], n: int, echo: bool,
                 num_logprobs: int | None):
        self._tokens = _TokenText(tokenizer)
        self._prompts = prompts
        self._echo = echo
        self._num_logprobs = num_logprobs
        self._started = [False] * (len(prompts) * n)
        self._text_offset = [0] * (len(prompts) * n)  # characters before the next token

    def opening(self) -> list[dict]:
        return []

    def piece(self, piece: _Piece) -> dict:
        return self.whole(piece)

    def whole(self, piece: _Piece) -> dict:
        text, token_ids, logprobs = piece.text, piece.token_ids, piece.logprobs
        if self._echo and not self._started[piece.index]:
            prompt = self._prompts[piece.prompt_index]
            prompt_text = prompt.text
            if prompt_text is None:
                prompt_text = self._tokens.tokenizer.decode(prompt.token_ids)
            text = prompt_text + text
            token_ids = prompt.token_ids + token_ids
            if logprobs is not None:
                logprobs = list(piece.prompt_logprobs) + logprobs
        self._started[piece.index] = True
        return {"index": piece.index, "text": text,
                "logprobs": None if logprobs is None else self._logprobs(piece.index, token_ids,
                                                                          logprobs),
                "finish_reason": piece.finish_reason}

    def _logprobs(self, index: int, token_ids: list[int], entries: list[Logprobs | None]) -> dict:
        strings = self._tokens.strings(token_ids)
        offsets = []
        for string in strings:
            offsets.append(self._text_offset[index])
            self._text_offset[index] += len(string)
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
                "top_logprobs": top, "text_offset": offsets}


class _ChatChoices:
    """Choices of /v1/chat/completions: `message` when whole, `delta` when streamed (after an
    opening chunk per choice with the role); logprobs as
    {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    id_prefix, kind, chunk_kind = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer, n: int, num_top: int):
        self._tokens = _TokenText(tokenizer)
        self._n = n
        self._num_top = num_top

    def opening(self) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(self._n)]

    def whole(self, piece: _Piece) -> dict:
        return {"index": piece.index, "message": {"role": "assistant", "content": piece.text},
                "logprobs": self._logprobs(piece), "finish_reason": piece.finish_reason}

    def piece(self, piece: _Piece) -> dict:
        return {"index": piece.index, "delta": {"content": piece.text} if piece.text else {},
                "logprobs": self._logprobs(piece), "finish_reason": piece.finish_reason}

    def _logprobs(self, piece: _Piece) -> dict | None:
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


class _TokenText:
    """A token id as logprobs show it: its own bytes (a byte-level BPE token may hold part of
    a UTF-8 character; decoding it alone would lose them) and those bytes as text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        described = repr(decoder)
        self._byte_level = "ByteLevel" in described
        self._sentencepiece = "\u2581" in described or "Metaspace" in described

    def bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if self._sentencepiece:
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                return bytes([int(match[1], 16)])
            return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id]).encode()

    def string(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def strings(self, token_ids: list[int]) -> list[str]:
        return [self.string(t) for t in token_ids]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_OF_CHAR = {char: byte for byte, char in _bytes_to_unicode().items()}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback tokens
