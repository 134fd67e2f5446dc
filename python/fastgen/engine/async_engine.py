"""The engine for a server: LLMEngine stepped by one background thread while asyncio code adds,
streams and cancels requests at any time.

    engine = AsyncLLMEngine(LLMEngine(config))
    engine.start()                        # or engine.run_forever() on a thread of your own
    stream = engine.add_request(token_ids, SamplingParams(max_tokens=64),
                                RequestOutputKind.DELTA)  # may raise at once
    try:
        async for out in stream:          # one RequestOutput per step that advanced it
            send(out.outputs[0].delta)
    finally:
        stream.abort()                    # no-op once finished; frees the blocks otherwise

Only the engine thread touches LLMEngine's state. On CPU that thread should be the one that
loaded the model (fastgen-serve runs the engine on its main thread and the HTTP server on
another): torch's OpenMP pool belongs to the thread that first ran parallel work, and a second
thread running ops beside it gets its own pool, with more threads than cores, whose workers
sleep between regions instead of spinning; decode at batch 1 measured 36 tok/s instead of 61. The event loop hands it requests and aborts
through a locked inbox, so an `add_request` never waits for a step (a step of a big batch takes
a while, and the loop keeps streaming meanwhile); outputs come back through each stream's
asyncio queue via call_soon_threadsafe. Between steps the thread sleeps on a condition until
there is work. torch releases the GIL inside its kernels, so the loop stays responsive during a
forward pass.

add_request refuses at once, before anything is queued: ValueError for a request that could
never run (the same checks LLMEngine.add_request makes), QueueFullError when
max_waiting_requests are already queued (a server answers 503 rather than growing without
bound). If a step raises, the requests in flight get the error (their streams raise it) and are
dropped; the engine goes on serving new ones, unless the error was a lost tensor-parallel worker
(WorkerLostError): then the loop ends, `dead` holds an EngineDeadError, and every request after
gets it (a server answers 503 and exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastgen.config import SamplingParams
from fastgen.engine.engine import LLMEngine
from fastgen.engine.parallel import WorkerLostError
from fastgen.outputs import RequestOutput, RequestOutputKind

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting to be admitted; retry later."""


class EngineDeadError(RuntimeError):
    """The engine stopped after an error it cannot recover from (a tensor-parallel worker was
    lost); a server answers 503 and exits."""


class RequestStream:
    """One request's outputs as an async iterator; ends after the finished one."""

    def __init__(self, engine: AsyncLLMEngine, prompt_token_ids: list[int],
                 params: SamplingParams, prompt: str | None, output_kind: RequestOutputKind):
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.prompt = prompt
        self.output_kind = output_kind
        self.request_id: int | None = None  # the LLMEngine's, once the engine thread adds it
        self.finished = False
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Cancels the request unless it has finished (a client went away)."""
        if not self.finished:
            self.finished = True
            self._engine._abort(self)

    # Called from the engine thread.

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)


@dataclass
class _Abort:
    stream: RequestStream


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 1024):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._inbox: list[RequestStream | _Abort] = []
        self._wakeup = threading.Condition()
        self._streams: dict[int, RequestStream] = {}  # by LLMEngine request id
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: EngineDeadError | None = None  # set when the loop ended on a fatal error

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted: queued here, or waiting in the scheduler."""
        with self._wakeup:
            queued = sum(isinstance(item, RequestStream) for item in self._inbox)
        return queued + self.engine.num_waiting

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self.run_forever, name="fastgen-engine",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the engine loop after its current step (joining the thread start() made);
        requests in flight are dropped."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None,
                    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
                    ) -> RequestStream:
        """Queues a request; call from the event loop. Raises ValueError when it could never
        run and QueueFullError when too many are waiting. output_kind: as LLMEngine.add_request
        (a server streams DELTA outputs)."""
        if self.dead is not None:
            raise self.dead
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        self.engine.check_request(len(prompt_token_ids), params)
        if self.num_waiting >= self.max_waiting_requests:
            raise QueueFullError(f"{self.max_waiting_requests} requests are already waiting; "
                                 f"retry later")
        stream = RequestStream(self, list(prompt_token_ids), params, prompt, output_kind)
        with self._wakeup:
            self._inbox.append(stream)
            self._wakeup.notify()
        return stream

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None,
                       output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
                       ) -> AsyncIterator[RequestOutput]:
        """add_request and iterate, cancelling the request if the caller stops early."""
        stream = self.add_request(prompt_token_ids, params, prompt, output_kind)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def _abort(self, stream: RequestStream) -> None:
        with self._wakeup:
            self._inbox.append(_Abort(stream))
            self._wakeup.notify()

    # The engine thread.

    def run_forever(self) -> None:
        """The engine loop, on the calling thread, until stop() (from any thread)."""
        engine = self.engine
        while True:
            with self._wakeup:
                while not (self._inbox or self._stopping or engine.has_unfinished()):
                    self._wakeup.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
            for item in inbox:
                self._handle(item)
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except WorkerLostError as error:
                logger.error("%s; failing the requests in flight and stopping", error)
                self.dead = EngineDeadError(f"the engine stopped: {error}")
                self._fail_all(self.dead)
                break
            except Exception as error:  # noqa: BLE001  (a bug or OOM must not kill the server)
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(error)
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                stream._put(out)
        self._fail_all(RuntimeError("the engine was stopped"))

    def _handle(self, item: RequestStream | _Abort) -> None:
        engine = self.engine
        if isinstance(item, _Abort):
            stream = item.stream
            if stream.request_id is not None and stream.request_id in self._streams:
                del self._streams[stream.request_id]
                engine.abort_request(stream.request_id)
            return
        stream = item
        if stream.finished:
            return  # aborted before it reached the engine
        try:
            stream.request_id = engine.add_request(stream.prompt_token_ids, stream.params,
                                                   stream.prompt, stream.output_kind)
        except ValueError as error:
            stream._put(error)
            return
        self._streams[stream.request_id] = stream

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream._put(error)
        self._streams.clear()
