"""The FastAPI app: one AsyncLLMEngine behind the OpenAI-compatible routes (openai_api.py) and
Megatron-LM's `PUT /api` (megatron_api.py), plus /health, /v1/models, /metrics and the chat page
at / (chat_page.py).

Shared state lives on `app.state`: `engine` (AsyncLLMEngine), `model_name` (the name clients
must send as "model"), `max_model_len`, `metrics` (ServerMetrics: routes time their requests with
`metrics.request(endpoint, ...)`). Cross-cutting rules are enforced here, once:
- `api_key`: every path but /health and the chat page's files needs `Authorization: Bearer
  <key>` (401 otherwise);
- `max_body_bytes`: larger request bodies get 413 before they are read into memory;
- any error is OpenAI's error JSON (errors.py): validation failures are 400, not FastAPI's 422.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from fastgen.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from fastgen.server import chat_page
from fastgen.server.errors import APIError, error_response
from fastgen.server.metrics import ServerMetrics
from fastgen.server.tools import TOOL_CALL_PARSERS

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 << 20  # 8 MiB: far more than any context's worth of text


def build_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, start_engine: bool = True,
              tool_call_parser: str = "auto", ui: bool = True) -> FastAPI:
    """start_engine: the app's lifespan runs the engine on a thread of its own; False when the
    caller runs engine.run_forever() itself (fastgen-serve, on its main thread).
    tool_call_parser: how tool calls are read from outputs (server/tools.py).
    ui: serve the chat page at / (False: / is a 404, as for fastgen-serve --no-ui)."""
    if tool_call_parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool call parser {tool_call_parser!r}; choose one of: "
                         f"{', '.join(TOOL_CALL_PARSERS)}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                engine.stop()

    app = FastAPI(title="fastgen", lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = model_name
    app.state.max_model_len = engine.engine.max_model_len
    app.state.tool_call_parser = tool_call_parser
    app.state.metrics = metrics = ServerMetrics(engine)

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes,
                       open_paths=chat_page.PATHS if ui else ())

    def refuse(request: Request, status: int, message: str, param: str | None = None,
               headers: dict[str, str] | None = None):
        return error_response(status, message, param, path=request.url.path, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return refuse(request, error.status, error.message, error.param)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, error: ValueError):
        return refuse(request, 400, str(error))

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, error: QueueFullError):
        return refuse(request, 503, str(error))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, error: EngineDeadError):
        return refuse(request, 503, str(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return refuse(request, 400, _describe(error), _param(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        # error.headers: Allow on a 405 (the methods the path takes), kept as Starlette sets it.
        return refuse(request, error.status_code, str(error.detail), headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        logger.exception("unhandled error")
        return refuse(request, 500, f"internal error: {type(error).__name__}: {error}")

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return error_response(503, str(engine.dead))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "fastgen",
            "max_model_len": app.state.max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    from fastgen.server import megatron_api, openai_api, openapi

    app.include_router(openai_api.router)
    app.include_router(megatron_api.router)
    openapi.install(app)
    if ui:
        chat_page.install(app)
    return app


class _Guard:
    """The API key and body size rules, checked before any route runs. Plain ASGI rather than
    @app.middleware("http") (BaseHTTPMiddleware): that one relays every response through a
    queue, and a route behind it can no longer see its client disconnect."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 open_paths: tuple[str, ...] = ()):
        self.app = app
        self.api_key = api_key
        self.open_paths = frozenset(("/health", *open_paths))  # no key needed
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        path = scope["path"]
        if self.api_key is not None and path not in self.open_paths:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            # Bytes: compare_digest refuses str with non-ASCII characters.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.api_key.encode()):
                return error_response(401, "missing or wrong API key: send 'Authorization: "
                                           "Bearer <key>'", path=path,
                                      headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "invalid Content-Length header", path=path)
            if int(length) > self.max_body_bytes:
                return error_response(413, f"request body of {length} bytes is over the "
                                           f"{self.max_body_bytes}-byte limit", path=path)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            return error_response(411, "send a Content-Length; chunked request bodies are not "
                                       "accepted", path=path)
        return None


def _where(loc: tuple) -> str:
    """A pydantic error's location as a field path: messages[0].content ("" for the body)."""
    where = ""
    for part in loc:
        if part == "body" and not where:
            continue
        if isinstance(part, int):
            where += f"[{part}]"
        else:
            where += f".{part}" if where else str(part)
    return where


def _describe(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = _where(item.get("loc", ()))
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "; ".join(parts) or "invalid request"


def _param(error: RequestValidationError) -> str | None:
    for item in error.errors():
        where = _where(item.get("loc", ()))
        if where:
            return where
    return None
