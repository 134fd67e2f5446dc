"""The FastAPI app: one AsyncLLMEngine behind the OpenAI-compatible routes (openai_api.py) and
Megatron-LM's `PUT /api` (megatron_api.py), plus /health, /v1/models and /metrics.

Shared state lives on `app.state`: `engine` (AsyncLLMEngine), `model_name` (the name clients
must send as "model"), `max_model_len`. Cross-cutting rules are enforced here, once:
- `api_key`: every path but /health needs `Authorization: Bearer <key>` (401 otherwise);
- `max_body_bytes`: larger request bodies get 413 before they are read into memory;
- any error is OpenAI's error JSON (errors.py): validation failures are 400, not FastAPI's 422.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastgen.engine.async_engine import AsyncLLMEngine, QueueFullError
from fastgen.server.errors import APIError, error_response

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 << 20  # 8 MiB: far more than any context's worth of text


def build_app(engine: AsyncLLMEngine, model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="fastgen", lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = model_name
    app.state.max_model_len = engine.engine.max_model_len

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), api_key):
                return error_response(401, "missing or wrong API key: send 'Authorization: "
                                           "Bearer <key>'")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "invalid Content-Length header")
            if int(length) > max_body_bytes:
                return error_response(413, f"request body of {length} bytes is over the "
                                           f"{max_body_bytes}-byte limit")
        elif request.headers.get("transfer-encoding", "").lower() == "chunked":
            return error_response(411, "send a Content-Length; chunked request bodies are not "
                                       "accepted")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError):
        return error_response(error.status, error.message, error.param)

    @app.exception_handler(ValueError)
    async def value_error(_: Request, error: ValueError):
        return error_response(400, str(error))

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, error: QueueFullError):
        return error_response(503, str(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError):
        return error_response(400, _describe(error), _param(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception):
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(error).__name__}: {error}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "fastgen",
            "max_model_len": app.state.max_model_len}]}

    from fastgen.server import megatron_api, openai_api

    app.include_router(openai_api.router)
    app.include_router(megatron_api.router)
    return app


def _describe(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "; ".join(parts) or "invalid request"


def _param(error: RequestValidationError) -> str | None:
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        if loc:
            return ".".join(loc)
    return None
