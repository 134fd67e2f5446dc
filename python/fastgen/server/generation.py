"""One API request's engine requests, run as one `Generation`: what every route (OpenAI's
completions and chat, Megatron's `PUT /api`) does between checking a request and rendering its
answer.

A request becomes one engine request per prompt, all queued at once (continuous batching batches
them with everyone else's), all or none: a refusal (ValueError, QueueFullError) cancels those
already queued. Each asks for DELTA outputs (what is new at each step), which one pump task per
engine request forwards into one queue, so the route reads a single async stream of (prompt
index, output); the generation times each output for the metrics and adds them up into each
prompt's final output (`finals`).

- Streaming routes iterate `outputs()` and call `close()` however the response ends.
- Non-streaming routes `await finish(receive)`: the final outputs, or None when the client
  disconnected first (answer CLIENT_CLOSED_REQUEST). Meanwhile a task waits for the client's
  disconnect message, which uvicorn delivers but never acts on: it does not cancel a handler
  whose client left, so without this a request would run to its end for nobody.

`close()` cancels every engine request not finished, freeing its KV blocks at once; it is
idempotent and every path out of a route ends in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastgen.config import SamplingParams
from fastgen.engine.async_engine import AsyncLLMEngine, RequestStream
from fastgen.outputs import RequestOutput, RequestOutputKind
from fastgen.server.metrics import RequestMetrics, ServerMetrics

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer

Receive = Callable[[], Awaitable[dict]]  # the ASGI receive channel (Starlette's request.receive)


@dataclass(frozen=True)
class Prompt:
    text: str | None  # as the client sent it; None when sent as token ids
    token_ids: list[int]


def check_token_ids(engine: AsyncLLMEngine, token_ids: list[int], where: str) -> None:
    """ValueError naming `where` for a token id outside the model's vocabulary."""
    vocab_size = engine.engine.vocab_size
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{where}: token id {bad} is outside the vocabulary (0 to "
                         f"{vocab_size - 1})")


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected."""


class Generation:
    """An API request's engine requests (one per prompt), their DELTA outputs merged into one
    async stream, timed, and added up per prompt."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, endpoint: str,
                 prompts: list[Prompt], params: list[SamplingParams], arrival: float):
        """params: one per prompt. endpoint: the metrics' label. arrival: time.monotonic() when
        the request came in. Raises what AsyncLLMEngine.add_request raises, having cancelled
        the requests already queued."""
        self.prompts = prompts
        # Per prompt, its DELTA outputs so far added up (whole once finished).
        self.finals: list[RequestOutput | None] = [None] * len(prompts)
        self._queue: asyncio.Queue[tuple[int | None, RequestOutput | BaseException]] = \
            asyncio.Queue()
        self._streams: list[RequestStream] = []
        self._timers: list[RequestMetrics] = []
        self._pumps: list[asyncio.Task] = []
        try:
            for prompt, prompt_params in zip(prompts, params, strict=True):
                self._streams.append(engine.add_request(
                    prompt.token_ids, prompt_params, prompt.text, RequestOutputKind.DELTA))
        except BaseException:
            self.close()
            raise
        self._timers = [metrics.request(endpoint, arrival, len(p.token_ids)) for p in prompts]
        self._pumps = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self._streams)]

    async def _pump(self, index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((index, out))
        except Exception as error:  # noqa: BLE001  (handed to the consumer, raised there)
            self._queue.put_nowait((index, error))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, DELTA output) as the engine produces them, until every request
        finished; `finals` already holds each output when it is yielded. Raises the first
        engine error (ValueError, ...)."""
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

    async def finish(self, receive: Receive) -> list[RequestOutput] | None:
        """Runs the generation to its end and closes it: every prompt's final output, in
        order, or None when the client disconnected first. Raises the first engine error."""
        watcher = asyncio.create_task(self._watch_disconnect(receive))
        try:
            async for _ in self.outputs():
                pass
            return self.finals
        except _ClientGone:
            return None
        finally:
            watcher.cancel()
            self.close()

    async def _watch_disconnect(self, receive: Receive) -> None:
        # The body has been read, so the next ASGI message can only be the disconnect: waiting
        # for it costs nothing, unlike polling request.is_disconnected().
        while (await receive())["type"] != "http.disconnect":
            pass
        self._queue.put_nowait((None, _ClientGone()))

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        """Generated so far, summed over every sample of every prompt."""
        return sum(len(s.token_ids) for out in self.finals if out is not None
                   for s in out.outputs)

    def close(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        for stream in self._streams:
            stream.abort()  # a no-op once finished
        for timer in self._timers:
            timer.abort()   # likewise
