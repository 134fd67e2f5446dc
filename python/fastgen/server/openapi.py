"""The served /openapi.json: every route's real request body and responses.

The routes read their bodies themselves (server/body.py: any Content-Type, surrogate checks,
strict types, Megatron's messages), so FastAPI cannot see them; this module declares them. The
request models are the ones the routes validate with (protocol.py; Megatron's dataclasses through
pydantic's TypeAdapter), the response models below describe what render.py and megatron_api.py
write, every route lists OpenAI's error body for its 4xx / 5xx answers, streaming routes add
`text/event-stream`, and /metrics is Prometheus text, not JSON.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, TypeAdapter

from fastgen.server import protocol

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """Every error (Megatron's routes add the top-level `message`)."""

    error: ErrorDetail
    message: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None  # {tokens, token_logprobs, top_logprobs, text_offset}
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ToolCallOut(BaseModel):
    id: str
    type: str = "function"
    function: dict[str, str]  # {name, arguments (JSON text)}


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None  # {content: [{token, logprob, bytes, top_logprobs}]}
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class MegatronResponse(BaseModel):
    text: list[str]
    tokens: list[list[int]]
    logprobs: list[list[float]] | None = None
    segments: list[list[str]]


class MegatronCompletionResponse(BaseModel):
    choices: list[dict[str, Any]]  # {index, text, logprobs: {token_logprobs, tokens, ...}}


def _megatron_bodies() -> dict[str, dict]:
    """The Megatron routes' bodies, from the dataclasses their parsers fill (field names as
    Megatron spells them)."""
    from fastgen.server.megatron_api import MegatronCompletionRequest, MegatronRequest

    put = TypeAdapter(MegatronRequest).json_schema(ref_template=REF)
    put["properties"]["add_BOS"] = put["properties"].pop("add_bos")
    put["title"] = "MegatronGenerateRequest"
    post = TypeAdapter(MegatronCompletionRequest).json_schema(ref_template=REF)
    post["properties"]["prompt"] = post["properties"].pop("prompts")
    post["required"] = ["prompt", "max_tokens"]
    post["title"] = "MegatronCompletionRequest"
    return {"MegatronGenerateRequest": put, "MegatronCompletionRequest": post}


# path -> method -> (request model name or None, response model, streams)
ROUTES: dict[str, dict[str, tuple[str | None, type[BaseModel] | None, bool]]] = {
    "/v1/completions": {"post": ("CompletionRequest", CompletionResponse, True)},
    "/v1/chat/completions": {"post": ("ChatCompletionRequest", ChatCompletionResponse, True)},
    "/tokenize": {"post": ("TokenizeRequest", TokenizeResponse, False)},
    "/detokenize": {"post": ("DetokenizeRequest", DetokenizeResponse, False)},
    "/api": {"put": ("MegatronGenerateRequest", MegatronResponse, False)},
    "/completions": {"post": ("MegatronCompletionRequest", MegatronCompletionResponse, False)},
    "/v1/models": {"get": (None, ModelList, False)},
    "/health": {"get": (None, Health, False)},
    "/metrics": {"get": (None, None, False)},
}
REQUEST_MODELS = (protocol.CompletionRequest, protocol.ChatCompletionRequest,
                  protocol.TokenizeRequest, protocol.DetokenizeRequest)
ERRORS = {"400": "invalid request", "401": "missing or wrong API key", "404": "unknown model",
          "405": "wrong method", "413": "body too large", "503": "queue full or engine stopped"}


def _schema_of(model: type[BaseModel], components: dict) -> dict:
    schema = model.model_json_schema(ref_template=REF, by_alias=True)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def build_schema(app: FastAPI) -> dict:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="fastgen: OpenAI-compatible and Megatron-LM APIs")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in REQUEST_MODELS:
        _schema_of(model, components)
    components.update(_megatron_bodies())
    error = _schema_of(ErrorResponse, components)
    for path, methods in ROUTES.items():
        for method, (request, response, streams) in methods.items():
            operation = schema["paths"].get(path, {}).get(method)
            if operation is None:
                continue
            if request is not None:
                operation["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": REF.format(model=request)}}}}
            if response is None:  # /metrics
                ok = {"description": "Prometheus text exposition",
                      "content": {"text/plain": {"schema": {"type": "string"}}}}
            else:
                ok = {"description": "OK", "content": {"application/json": {
                    "schema": _schema_of(response, components)}}}
                if streams:
                    ok["content"]["text/event-stream"] = {"schema": {
                        "type": "string", "description": "with stream: true, `data: {chunk}` "
                                                         "events, then `data: [DONE]`"}}
            operation["responses"] = {"200": ok, **{
                status: {"description": why, "content": {"application/json": {"schema": error}}}
                for status, why in ERRORS.items()}}
    return schema


def install(app: FastAPI) -> None:
    """Serves build_schema(app) (made once, on the first request) at /openapi.json."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    app.openapi = openapi
