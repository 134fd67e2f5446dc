"""Megatron-LM's text generation API, `PUT /api` (its `MegatronGenerate.put`), served by the same
AsyncLLMEngine as the OpenAI routes, so existing Megatron clients can point at fastgen.

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

Accepted and validated but without effect: `top_p_decay` and `top_p_bound` (fastgen's sampler
keeps top_p fixed during a request; Megatron shrinks it by the decay after every token, down to
the bound), `length_penalty` (beam search only) and `no_log` (fastgen logs no prompts).
Refused: `prevent_newline_after_colon: true` (it needs a logits hook fastgen's sampler lacks),
`beam_width` (no beam search), and the retired `max_len` / `sentences`, with Megatron's hints.
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
from fastgen.server.generation import CLIENT_CLOSED_REQUEST, Generation, Prompt
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
        if fields.boolean("prevent_newline_after_colon"):
            raise _refuse("prevent_newline_after_colon=true is not supported by fastgen")
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
                   top_p_bound, add_bos, stop_on_eol, stop_on_double_eol, random_seed,
                   stop_token, length_penalty)

    def sampling_params(self, index: int) -> SamplingParams:
        """The engine's parameters for prompt `index`."""
        greedy = self.top_k == 1
        stop = ["\n\n"] if self.stop_on_double_eol else ["\n"] if self.stop_on_eol else []
        return SamplingParams(
            max_tokens=self.tokens_to_generate,
            temperature=0.0 if greedy else self.temperature,
            top_k=self.top_k if self.top_k > 1 else None,
            top_p=self.top_p if self.top_p > 0 else None,
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
