"""POST /v1/completions and POST /v1/chat/completions, answered as OpenAI (and vLLM) answer them.

A request becomes one engine request per prompt (a completions `prompt` may be a list; a chat
has one conversation), each with n samples: choice index = prompt index * n + sample index. They
run as one Generation (generation.py, shared with Megatron's route: queued all or none, DELTA
outputs added up per prompt, timed, cancelled when the client leaves); the answer is rendered by
render.py, whole (one JSON body, or 499 when the client left first) or streamed (server-sent
events, closing the generation however the response ends).

Everything a client can get wrong is checked before anything is queued: the model name, the
prompt (empty, longer than the context, token ids outside the vocabulary), max_tokens against the
context, the sampling values, n. Each is a 400 in OpenAI's error JSON (raised here as APIError or
ValueError, or a pydantic error, and rendered by the app's handlers); a full queue is a 503.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from fastgen.config import SamplingParams
from fastgen.engine.async_engine import AsyncLLMEngine
from fastgen.server.body import read_json_object
from fastgen.server.errors import APIError
from fastgen.server.generation import (
    CLIENT_CLOSED_REQUEST,
    Generation,
    Prompt,
    check_token_ids,
)
from fastgen.server.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from fastgen.server.render import (
    ChatChoices,
    Choices,
    CompletionChoices,
    event_stream,
    keep_best,
    usage,
    whole_answer,
)
from fastgen.server.tools import parser_for
from fastgen.tokenization import Conversation, render_chat

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(request: Request):
    arrival = time.monotonic()
    body: CompletionRequest = await _accept(request, CompletionRequest)
    engine: AsyncLLMEngine = request.app.state.engine
    tokenizer = engine.tokenizer
    prompts = [Prompt(p, tokenizer.encode(p)) if isinstance(p, str) else Prompt(None, p)
               for p in body.prompts()]
    max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    # echo with logprobs shows the prompt's logprobs too (how clients score a text). best_of
    # draws best_of samples, each with its sampled tokens' logprobs, to rank them by.
    n, best_of = (1 if body.n is None else body.n), body.num_candidates
    logprobs = body.logprobs if best_of == n or body.logprobs is not None else 0
    params = body.sampling_params(max_tokens, logprobs, body.logprobs if body.echo else None,
                                  n=best_of)
    for i, prompt in enumerate(prompts):
        _check_prompt(engine, prompt.token_ids, params,
                      "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    generation = _start(request, "completions", prompts, params, arrival)
    choices = CompletionChoices(tokenizer, prompts, n, body.echo, body.logprobs)
    if best_of > n:
        return await _best_answer(request, generation, choices, n, body.logprobs is not None)
    return await _answer(request, body, generation, choices)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request):
    arrival = time.monotonic()
    body: ChatCompletionRequest = await _accept(request, ChatCompletionRequest)
    engine: AsyncLLMEngine = request.app.state.engine
    tools = body.tool_use()
    token_ids = _render_chat(engine.tokenizer, body.conversation(),
                             tools.shown if tools is not None else None)
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        max_tokens = _room(engine, len(token_ids))
    elif max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    constraint = body.constraint()
    forced = tools.constraint() if tools is not None else None
    if forced is not None and constraint is not None:
        raise APIError(400, f"tool_choice {tools.mode} forces the output's format; it cannot be "
                            f"combined with response_format or another structured output",
                       "tool_choice")
    params = body.sampling_params(max_tokens, body.num_logprobs, constraint=forced or constraint)
    _check_prompt(engine, token_ids, params, "messages")
    generation = _start(request, "chat_completions", [Prompt(None, token_ids)], params, arrival)
    parser = (None if tools is None else
              parser_for(request.app.state.tool_call_parser,
                         getattr(engine.tokenizer, "chat_template", None)))
    return await _answer(request, body, generation,
                         ChatChoices(engine.tokenizer, params.n, body.top_logprobs or 0, tools,
                                     parser))


@router.post("/tokenize")
async def tokenize(request: Request):
    """vLLM's /tokenize: {count, max_model_len, tokens, token_strs}."""
    body: TokenizeRequest = await _accept(request, TokenizeRequest)
    tokenizer = request.app.state.engine.tokenizer
    if body.messages is not None:
        ids = _render_chat(tokenizer, body.conversation(),
                           add_generation_prompt=body.add_generation_prompt,
                           continue_final_message=body.continue_final_message)
        if body.add_special_tokens:  # the template writes its own; vLLM adds BOS on request
            ids = tokenizer.build_inputs_with_special_tokens(ids)
    else:
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens
                               is not False)
    strings = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": request.app.state.max_model_len,
            "tokens": ids, "token_strs": strings}


@router.post("/detokenize")
async def detokenize(request: Request):
    """vLLM's /detokenize: {prompt} (special tokens kept, as vLLM)."""
    body: DetokenizeRequest = await _accept(request, DetokenizeRequest)
    engine: AsyncLLMEngine = request.app.state.engine
    check_token_ids(engine, body.tokens, "tokens")
    return {"prompt": engine.tokenizer.decode(body.tokens)}


def _start(request: Request, endpoint: str, prompts: list[Prompt], params: SamplingParams,
           arrival: float) -> Generation:
    state = request.app.state
    return Generation(state.engine, state.metrics, endpoint, prompts, [params] * len(prompts),
                      arrival)


async def _answer(request: Request, body: CompletionRequest | ChatCompletionRequest,
                  generation: Generation, choices: Choices) -> Response:
    """The answer, streamed or whole."""
    head = _head(request, choices)
    if body.stream:
        return event_stream(generation, {**head, "object": choices.chunk_kind}, choices,
                            body.include_usage)
    if await generation.finish(request.receive) is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(whole_answer(generation, head, choices))


def _head(request: Request, choices: Choices) -> dict:
    """An answer's id, object, created and model."""
    return {"id": f"{choices.id_prefix}-{uuid.uuid4().hex}", "object": choices.kind,
            "created": int(time.time()), "model": request.app.state.model_name}


async def _best_answer(request: Request, generation: Generation, choices: Choices, n: int,
                       keep_logprobs: bool) -> Response:
    """best_of: of each prompt's samples, the n with the highest cumulative logprob (of their
    sampled tokens, in the raw model distribution), most likely first; the usage counts every
    sample generated."""
    head = {"id": f"{choices.id_prefix}-{uuid.uuid4().hex}", "object": choices.kind,
            "created": int(time.time()), "model": request.app.state.model_name}
    finals = await generation.finish(request.receive)
    if finals is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    spent = usage(generation)
    generation.finals = [keep_best(out, n, keep_logprobs) for out in finals]
    return JSONResponse({**whole_answer(generation, head, choices), "usage": spent})


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
    data = read_json_object(await request.body())
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
    try:
        check_token_ids(engine, token_ids, where)
    except ValueError as error:
        raise APIError(400, str(error), where) from None
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


def _render_chat(tokenizer, conversation: Conversation, tools: list[dict] | None = None,
                 **options) -> list[int]:
    """render_chat, its errors as 400s."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model has no chat template; use /v1/completions")
    try:
        return render_chat(tokenizer, conversation, tools, **options)
    except Exception as error:  # noqa: BLE001  (jinja's TemplateError, or a template's raise)
        raise APIError(400, f"the chat template refused these messages: {error}",
                       "messages") from None
