"""Megatron-LM's text generation API, `PUT /api` (its `MegatronGenerate.put`) and its OpenAI-like
`POST /completions` (below), served by the same AsyncLLMEngine as the OpenAI routes, so existing
Megatron clients can point at fastgen.

    PUT /api {"prompts": ["The capital of France is"], "tokens_to_generate": 16, "top_k": 1}
    -> {"text": [prompt + generation], "tokens": [[prompt + generated ids]],
        "segments": [[each token's text]], "logprobs": [[...]] (only when asked)}

Each prompt is its own engine request; they run as one Generation (generation.py, shared with the
OpenAI routes: all submitted at once, so continuous batching batches them with everyone else's,
their DELTA outputs timed and added up). The answer waits for the last; a client that disconnects
first aborts them all.

Megatron's validation rules, field by field and in its order, with two differences: every
refusal is HTTP 400 with the app's JSON error (Megatron answers most with a bare string and HTTP
200), and types are checked strictly (a bool is not an int; ints are accepted where it wants a
float). Megatron's sampling mapped onto fastgen's:
- `top_k == 1` is Megatron's greedy (argmax, whatever the temperature): temperature 0 here.
- `top_k` / `top_p` of 0 are off; `random_seed` seeds prompt i with random_seed + i, so equal
  prompts in one request still draw differently, as the rows of Megatron's batch do.
- `stop_on_eol` / `stop_on_double_eol` stop after the token that completes "\n" / "\n\n" (double
  wins when both are set, as in Megatron); that token stays in `tokens` and `text`, as in
  Megatron. EOS stops generation too (Megatron skips its EOS check under those two flags).
- `stop_token` is one more stop token id (Megatron reads it only for beam search).
- `logprobs` are those of the raw model distribution (before temperature and filters), as
  Megatron's: one per token after the first, prompt tokens included.

- `top_p_decay` / `top_p_bound`: as Megatron, top_p shrinks by the decay after every token,
  never below the bound (SamplingParams.top_p_at).
- `prevent_newline_after_colon`: after a token whose text ends with ":", no token whose text
  starts with a newline may come (Megatron bans its one "\n" token after its one ":" token; a
  BPE vocabulary has many of each).

Accepted and validated but without effect: `length_penalty` (beam search only) and `no_log`
(fastgen logs no prompts). Refused: `beam_width` (no beam search), and the retired `max_len` /
`sentences`, with Megatron's hints.
Megatron's `top_n_logprobs` response field is never produced: its `/api` has no way to ask.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fastgen.config import SamplingParams
from fastgen.engine.detokenizer import text_decoder
from fastgen.outputs import RequestOutput
from fastgen.server.body import read_json
from fastgen.server.errors import APIError
from fastgen.server.generation import (
    CLIENT_CLOSED_REQUEST,
    Generation,
    Prompt,
    check_token_ids,
)
from fastgen.server.protocol import split_prompts
from fastgen.tokenization import continuation_text

router = APIRouter()

MAX_PROMPTS = 128          # Megatron's limit per request
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1000
MAX_SEED = 2**63 - 1 - MAX_PROMPTS  # random_seed + prompt index must stay a valid torch seed


def _refuse(message: str) -> APIError:
    return APIError(400, message)


@dataclass(frozen=True)
class MegatronRequest:
    """A validated `PUT /api` body; defaults are Megatron's."""

    prompts: list[str]
    tokens_to_generate: int = 64
    logprobs: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    add_bos: bool = False
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False
    random_seed: int | None = None
    stop_token: int | None = None
    length_penalty: float = 1.0

    @classmethod
    def parse(cls, body: object) -> MegatronRequest:
        """Checks body as Megatron does, in its order; APIError(400) names the first problem."""
        if not isinstance(body, dict):
            raise _refuse("the request body must be a JSON object")
        fields = _Fields(body)
        if "prompts" not in body:
            raise _refuse("prompts argument required")
        if "max_len" in body:
            raise _refuse("max_len is no longer used; replace it with tokens_to_generate")
        if "sentences" in body:
            raise _refuse("sentences is no longer used; replace it with prompts")
        prompts = body["prompts"]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise _refuse("prompts must be a list of strings")
        if not prompts:
            raise _refuse("prompts is empty")
        if len(prompts) > MAX_PROMPTS:
            raise _refuse(f"at most {MAX_PROMPTS} prompts are allowed, got {len(prompts)}")

        tokens_to_generate = fields.integer("tokens_to_generate", 64, "an integer >= 0")
        if tokens_to_generate < 0:
            raise _refuse("tokens_to_generate must be an integer >= 0")
        logprobs = fields.boolean("logprobs")
        if tokens_to_generate == 0 and not logprobs:
            raise _refuse("tokens_to_generate=0 (scoring the prompts) needs logprobs=true")

        temperature = fields.number("temperature", 1.0,
                                    f"a number > 0 and <= {MAX_TEMPERATURE:g}")
        if not 0 < temperature <= MAX_TEMPERATURE:
            raise _refuse(f"temperature must be > 0 and <= {MAX_TEMPERATURE:g} (for greedy "
                          f"decoding send top_k=1), got {temperature}")
        top_k = fields.integer("top_k", 0, f"an integer in [0, {MAX_TOP_K}]")
        if not 0 <= top_k <= MAX_TOP_K:
            raise _refuse(f"top_k must be in [0, {MAX_TOP_K}] (0 is off), got {top_k}")
        top_p = fields.number("top_p", 0.0, "a number in [0, 1]")
        if top_p > 0 and top_k > 0:
            raise _refuse("cannot set both top_k and top_p sampling")
        if not 0 <= top_p <= 1:
            raise _refuse(f"top_p must be in [0, 1] (0 is off), got {top_p}")
        top_p_decay = fields.number("top_p_decay", 0.0, "a number in [0, 1]")
        if "top_p_decay" in body and top_p == 0:
            raise _refuse("top_p_decay cannot be set without top_p")
        if not 0 <= top_p_decay <= 1:
            raise _refuse(f"top_p_decay must be in [0, 1], got {top_p_decay}")
        top_p_bound = fields.number("top_p_bound", 0.0, "a number in (0, top_p]")
        if "top_p_bound" in body:
            if top_p == 0:
                raise _refuse("top_p_bound cannot be set without top_p")
            if not 0 < top_p_bound <= top_p:
                raise _refuse(f"top_p_bound must be > 0 and <= top_p ({top_p}), got "
                              f"{top_p_bound}")

        add_bos = fields.boolean("add_BOS")
        if not add_bos and any(not p for p in prompts):
            raise _refuse("empty prompts require add_BOS=true")
        stop_on_double_eol = fields.boolean("stop_on_double_eol")
        stop_on_eol = fields.boolean("stop_on_eol")
        prevent_newline_after_colon = fields.boolean("prevent_newline_after_colon")
        random_seed = fields.integer("random_seed", None, "an integer >= 0")
        if random_seed is not None and not 0 <= random_seed <= MAX_SEED:
            raise _refuse(f"random_seed must be an integer in [0, {MAX_SEED}], got "
                          f"{random_seed}")
        fields.boolean("no_log")
        if "beam_width" in body:
            raise _refuse("beam_width: beam search is not supported by fastgen")
        stop_token = fields.integer("stop_token", None, "a token id (an integer >= 0)")
        if stop_token is not None and stop_token < 0:
            raise _refuse(f"stop_token must be a token id (an integer >= 0), got {stop_token}")
        length_penalty = fields.number("length_penalty", 1.0, "a number")
        return cls(prompts, tokens_to_generate, logprobs, temperature, top_k, top_p, top_p_decay,
                   top_p_bound, add_bos, stop_on_eol, stop_on_double_eol,
                   prevent_newline_after_colon, random_seed, stop_token, length_penalty)

    def sampling_params(self, index: int) -> SamplingParams:
        """The engine's parameters for prompt `index`."""
        greedy = self.top_k == 1
        stop = ["\n\n"] if self.stop_on_double_eol else ["\n"] if self.stop_on_eol else []
        return SamplingParams(
            max_tokens=self.tokens_to_generate,
            temperature=0.0 if greedy else self.temperature,
            top_k=self.top_k if self.top_k > 1 else None,
            top_p=self.top_p if self.top_p > 0 else None,
            top_p_decay=self.top_p_decay if self.top_p > 0 else 0.0,
            top_p_bound=self.top_p_bound,
            prevent_newline_after_colon=self.prevent_newline_after_colon,
            seed=None if self.random_seed is None else self.random_seed + index,
            stop=stop,
            stop_token_ids=[] if self.stop_token is None else [self.stop_token],
            logprobs=0 if self.logprobs else None,
            prompt_logprobs=0 if self.logprobs else None)


class _Fields:
    """Typed reads of optional body fields: the default when absent, else a 400 on a bad type."""

    def __init__(self, body: dict):
        self.body = body

    def boolean(self, name: str) -> bool:
        value = self.body.get(name, False)
        if not isinstance(value, bool):
            raise _refuse(f"{name} must be a boolean")
        return value

    def integer(self, name: str, default: int | None, what: str) -> int | None:
        if name not in self.body:
            return default
        value = self.body[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise _refuse(f"{name} must be {what}, got {_show(value)}")
        return value

    def number(self, name: str, default: float, what: str) -> float:
        if name not in self.body:
            return default
        value = self.body[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise _refuse(f"{name} must be {what}, got {_show(value)}")
        return float(value)


def _show(value: object, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


@router.put("/api")
async def megatron_generate(request: Request) -> Response:
    req = MegatronRequest.parse(read_json(await request.body()))
    state = request.app.state
    tokenizer = state.engine.tokenizer
    prompts = [Prompt(prompt, _tokenize(tokenizer, prompt, req.add_bos))
               for prompt in req.prompts]
    _check_lengths([p.token_ids for p in prompts], req.tokens_to_generate, state.max_model_len)

    generation = Generation(state.engine, state.metrics, "megatron", prompts,
                            [req.sampling_params(i) for i in range(len(prompts))],
                            time.monotonic())
    outputs = await generation.finish(request.receive)
    if outputs is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it
    return JSONResponse(_response(tokenizer, req, outputs))


def _tokenize(tokenizer, prompt: str, add_bos: bool) -> list[int]:
    """Megatron's tokenization: the text's tokens alone, after BOS only when asked."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not add_bos:
        return ids
    if tokenizer.bos_token_id is None:
        raise _refuse("add_BOS=true, but the model's tokenizer has no BOS token")
    return [tokenizer.bos_token_id, *ids]


def _check_lengths(prompt_ids: list[list[int]], tokens_to_generate: int, max_len: int) -> None:
    """Megatron's rule: the longest prompt plus tokens_to_generate fits the context."""
    longest = max(len(ids) for ids in prompt_ids)
    if longest + tokens_to_generate > max_len:
        raise _refuse(f"the longest prompt ({longest} tokens) plus tokens_to_generate "
                      f"({tokens_to_generate}) is longer than the model's context ({max_len} "
                      f"tokens)")


def _response(tokenizer, req: MegatronRequest, outputs: list[RequestOutput]) -> dict:
    """Megatron's response: per prompt, the prompt's text plus the generation, the tokens of
    both, each token's own text, and (when asked) the logprob of every token after the first."""
    decode = text_decoder(tokenizer)
    texts, tokens, segments, logprobs = [], [], [], []
    for prompt, out in zip(req.prompts, outputs):
        generated = out.token_ids
        # Stop string included (Megatron's text is its tokens'), special tokens left out.
        texts.append(prompt + continuation_text(decode, out.prompt_token_ids, generated))
        tokens.append(out.prompt_token_ids + generated)
        segments.append(tokenizer.batch_decode([[t] for t in tokens[-1]]))
        if req.logprobs:
            prompt_part = [entry[t] for entry, t in zip(out.prompt_logprobs[1:],
                                                         out.prompt_token_ids[1:])]
            generated_part = [entry[t] for entry, t in zip(out.logprobs or [], generated)]
            logprobs.append(prompt_part + generated_part)
    response = {"text": texts, "tokens": tokens}
    if req.logprobs:
        response["logprobs"] = logprobs
    response["segments"] = segments
    return response


# POST /completions: Megatron's OpenAI-like completions (megatron/inference/endpoints/).

MAX_COMPLETION_LOGPROBS = 10  # Megatron's limit on top logprobs


@dataclass(frozen=True)
class MegatronCompletionRequest:
    """A validated `POST /completions` body. As Megatron: one choice per prompt (n and best_of
    must be 1), temperature 0 is greedy, generation also stops after the token completing a
    blank line ("\\n\\n", kept in the text), and the text is cut at the first `stop` string;
    max_tokens 0 scores the prompts and needs echo."""

    prompts: list[str] | list[list[int]]
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    logprobs: int = 0
    echo: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def parse(cls, body: object) -> MegatronCompletionRequest:
        if not isinstance(body, dict):
            raise _refuse("the request body must be a JSON object")
        fields = _Fields(body)
        try:
            prompts = split_prompts(body.get("prompt"))
        except ValueError as error:
            raise _refuse(str(error)) from None
        if "max_tokens" not in body:
            raise _refuse("max_tokens is required")
        max_tokens = fields.integer("max_tokens", None, "an integer >= 0")
        if max_tokens < 0:
            raise _refuse(f"max_tokens must be an integer >= 0, got {max_tokens}")
        temperature = fields.number("temperature", 1.0, "a number >= 0")
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise _refuse(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}")
        top_k = fields.integer("top_k", 0, f"an integer in [0, {MAX_TOP_K}]")
        if not 0 <= top_k <= MAX_TOP_K:
            raise _refuse(f"top_k must be in [0, {MAX_TOP_K}] (0 is off), got {top_k}")
        top_p = fields.number("top_p", 1.0, "a number in [0, 1]")
        if not 0 <= top_p <= 1:
            raise _refuse(f"top_p must be in [0, 1], got {top_p}")
        logprobs = fields.integer("logprobs", 0, f"an integer in [0, {MAX_COMPLETION_LOGPROBS}]")
        if not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise _refuse(f"logprobs > {MAX_COMPLETION_LOGPROBS} is not supported, got "
                          f"{logprobs}")
        echo = fields.boolean("echo")
        if max_tokens == 0 and not echo:
            raise _refuse("echo=False not supported when max_tokens=0")
        for name in ("n", "best_of"):
            if fields.integer(name, 1, "1") != 1:
                raise _refuse(f"{name} > 1 not supported")
        seed = fields.integer("seed", None, "an integer")
        if seed is not None and seed < 0:
            seed = None  # Megatron's -1: no seed
        elif seed is not None and seed > MAX_SEED:
            raise _refuse(f"seed must be at most {MAX_SEED}, got {seed}")
        stop = body.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise _refuse("stop must be a string or a list of non-empty strings")
        return cls(prompts, max_tokens, temperature, top_k, top_p, logprobs, echo, seed,
                   tuple(stop))

    def sampling_params(self, index: int) -> SamplingParams:
        greedy = self.temperature == 0 or self.top_k == 1
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=0.0 if greedy else self.temperature,
            top_k=self.top_k if self.top_k > 1 else None,
            top_p=self.top_p if 0 < self.top_p < 1 else None,
            seed=None if self.seed is None else self.seed + index,
            stop=["\n\n", *self.stop], logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.echo else None)


@router.post("/completions")
async def megatron_completions(request: Request) -> Response:
    req = MegatronCompletionRequest.parse(read_json(await request.body()))
    state = request.app.state
    engine = state.engine
    tokenizer = engine.tokenizer
    prompts = [Prompt(p, tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str)
               else Prompt(None, p) for p in req.prompts]
    for prompt in prompts:
        if not prompt.token_ids:
            raise _refuse("a prompt is empty")
        check_token_ids(engine, prompt.token_ids, "prompt")
    _check_lengths([p.token_ids for p in prompts], req.max_tokens, state.max_model_len)
    generation = Generation(engine, state.metrics, "megatron", prompts,
                            [req.sampling_params(i) for i in range(len(prompts))],
                            time.monotonic())
    outputs = await generation.finish(request.receive)
    if outputs is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse({"choices": [_completion_choice(tokenizer, req, i, out)
                                     for i, out in enumerate(outputs)]})


def _completion_choice(tokenizer, req: MegatronCompletionRequest, index: int,
                       out: RequestOutput) -> dict:
    """Megatron's choice: the text (the prompt first with echo) cut at the first stop string,
    and logprobs over its tokens: token_logprobs (None for the first prompt token), tokens
    (each decoded alone), text_offset, top_logprobs ({token text: logprob} per token when
    logprobs > 0, None otherwise)."""
    decode = text_decoder(tokenizer)
    prompt_ids, generated = out.prompt_token_ids, out.token_ids
    generated_text = continuation_text(decode, prompt_ids, generated)  # "\n\n" kept
    cuts = [generated_text.find(s) for s in req.stop if s in generated_text]
    if cuts:
        generated_text = generated_text[:min(cuts)]
    token_ids = list(generated)
    entries: list = list(out.logprobs or [None] * len(generated))
    text = generated_text
    if req.echo:
        prompt_text = out.prompt if out.prompt is not None else tokenizer.decode(prompt_ids)
        text = prompt_text + generated_text
        token_ids = prompt_ids + token_ids
        entries = list(out.prompt_logprobs or [None] * len(prompt_ids)) + entries
    strings = tokenizer.batch_decode([[t] for t in token_ids])
    offsets, position = [], 0
    for string in strings:
        offsets.append(position)
        position += len(string)
    # Only the tokens whose text starts inside the (cut) text.
    keep = sum(1 for offset in offsets if offset < len(text)) if text else 0
    token_ids, entries, strings, offsets = (token_ids[:keep], entries[:keep], strings[:keep],
                                            offsets[:keep])
    top = None
    if req.logprobs:
        top = [None if e is None else {tokenizer.decode([t]): v
                                       for t, v in list(e.items())[:req.logprobs]}
               for e in entries]
    return {"index": index, "text": text, "logprobs": {
        "token_logprobs": [None if e is None else e[t] for t, e in zip(token_ids, entries)],
        "tokens": strings, "text_offset": offsets, "top_logprobs": top}}
