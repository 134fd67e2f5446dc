"""Request bodies of the OpenAI-compatible routes (openai_api.py), as pydantic models, and their
translation into SamplingParams.

Fields follow OpenAI's API plus vLLM's sampling extras (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos) and vLLM's structured-output fields (`structured_outputs`, and the
older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`), which like OpenAI's
`response_format` become one StructuredOutputs. Unknown fields are ignored, as OpenAI clients send
extras (`user`, `metadata`, ...); fields OpenAI defines that change the output but that fastgen
does not implement (`suffix`) are refused with a 400 rather than silently dropped. Types are checked here, strictly (pydantic's strict mode: `true` is not an
int, `3.0` is not an int, `"yes"` is not a bool; an int is accepted where a number is), and a
pydantic error becomes a 400 naming the field; values are checked by SamplingParams (its
ValueError becomes a 400), except the few whose message would otherwise name the wrong field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fastgen.config import MAX_LOGPROBS, SamplingParams, StructuredOutputs
from fastgen.server.tools import ToolUse, message_for_template

MAX_N = 64  # samples per prompt: beyond this a request is a denial of service, not a use case
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

_INT64 = 2 ** 63


# Strict types (see the module's docstring); unknown fields ignored.
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = STRICT

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(True, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object, or json_schema."""

    model_config = STRICT

    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(BaseModel):
    """vLLM's `structured_outputs` object (its other keys, backend options, are ignored)."""

    model_config = STRICT

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingRequest(BaseModel):
    """What both routes share: the model name, sampling, streaming, structured outputs."""

    model_config = STRICT

    model: str | None = None  # None: the served model
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, lt=2 ** 31)  # vLLM's extra; 0 and -1 mean off, as in vLLM
    min_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)  # sample i uses seed + i (a torch seed)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias, -100 to 100
    user: str | None = None  # accepted and ignored
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def constraint(self) -> StructuredOutputs | None:
        """The one structured output the request asks for, however it asks (None for none);
        ValueError for two at once or an unknown response_format type."""
        asked: dict[str, StructuredOutputs] = {}
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            if fmt.type == "json_object":
                asked["response_format"] = StructuredOutputs(json_object=True)
            elif fmt.type == "json_schema":
                if fmt.json_schema is None:
                    raise ValueError("response_format: json_schema needs a json_schema object "
                                     "with the schema")
                asked["response_format"] = StructuredOutputs(json=fmt.json_schema.schema_)
            else:
                raise ValueError(f"response_format: unknown type {fmt.type!r}; use text, "
                                 f"json_object or json_schema")
        field = self.structured_outputs
        if field is not None:
            asked["structured_outputs"] = _structured("structured_outputs", json=field.json_,
                                                      json_object=bool(field.json_object),
                                                      regex=field.regex, choice=field.choice,
                                                      grammar=field.grammar)
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                           ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                asked[name] = _structured(name, **{kind: value})
        if len(asked) > 1:
            raise ValueError(f"ask for one structured output, not several: {', '.join(asked)}")
        return next(iter(asked.values()), None)

    def token_bias(self) -> dict[int, float] | None:
        """logit_bias with integer token ids; ValueError naming a key that is not one."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            bias[int(key)] = value
        return bias

    def sampling_params(self, max_tokens: int, logprobs: int | None = None,
                        prompt_logprobs: int | None = None, n: int | None = None,
                        constraint: StructuredOutputs | None = None) -> SamplingParams:
        """ValueError for a value out of range. n: samples to draw (default: the request's);
        constraint: the structured output (default: constraint())."""
        n = (1 if self.n is None else self.n) if n is None else n
        if n > MAX_N:
            raise ValueError(f"n must be at most {MAX_N} (the server's cap on samples per "
                             f"prompt), got {n}")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_or(self.temperature, SamplingParams.temperature),
            top_k=None if self.top_k in (None, 0, -1) else self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            n=n,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            seed=self.seed,
            presence_penalty=_or(self.presence_penalty, SamplingParams.presence_penalty),
            frequency_penalty=_or(self.frequency_penalty, SamplingParams.frequency_penalty),
            repetition_penalty=_or(self.repetition_penalty, SamplingParams.repetition_penalty),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=self.token_bias(),
            structured_outputs=self.constraint() if constraint is None else constraint,
        )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt`: a string, a list of strings, a list of token ids, or a
    list of token id lists; each prompt gets n choices."""

    prompt: Any  # checked by `prompts`, for one clear message instead of four union errors
    max_tokens: int | None = None  # None: 16, as OpenAI; 0 scores the prompt (with echo)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        n = 1 if self.n is None else self.n
        if self.best_of is not None:
            if self.best_of < n:
                raise ValueError(f"best_of must be at least n ({n}), got {self.best_of}")
            if self.best_of > MAX_N:
                raise ValueError(f"best_of must be at most {MAX_N}, got {self.best_of}")
            if self.stream and self.best_of > n:
                raise ValueError("best_of cannot be streamed: the best samples are known only "
                                 "once all have finished")

    @property
    def num_candidates(self) -> int:
        """Samples drawn per prompt: best_of, of which the n likeliest are returned."""
        n = 1 if self.n is None else self.n
        return n if self.best_of is None else self.best_of

    def prompts(self) -> list[str] | list[list[int]]:
        return split_prompts(self.prompt)


class ContentPart(BaseModel):
    model_config = STRICT

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = STRICT

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    """A call an assistant message made (OpenAI's shape), sent back in the conversation."""

    model_config = STRICT

    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = STRICT

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None             # tool

    def for_template(self, where: str) -> dict:
        """The message as a chat template reads it; ValueError naming `where` (messages[i])
        for a role or content this server cannot render."""
        if self.role not in CHAT_ROLES:
            raise ValueError(f"{where}.role: unknown role {self.role!r}; use one of: "
                             f"{', '.join(CHAT_ROLES)}")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"{where}.tool_calls: only assistant messages make tool calls")
        if self.content is None and not self.tool_calls:
            raise ValueError(f"{where}.content: a message needs content")
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            kinds = sorted({part.type for part in self.content if part.type != "text"})
            if kinds:
                raise ValueError(f"{where}.content: only text parts are supported, got "
                                 f"{', '.join(kinds)}")
            text = "\n".join(part.text or "" for part in self.content)
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        message: dict = {"role": role, "content": text}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None  # OpenAI's older name for max_completion_tokens
    max_completion_tokens: int | None = None  # None: what the context leaves after the prompt
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def check_supported(self) -> None:
        if not self.messages:
            raise ValueError("messages must hold at least one message")
        self.tool_use()  # ValueError for bad tools or tool_choice
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: top_logprobs alternatives (0 for the sampled token alone)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict]:
        return [message_for_template(m.for_template(f"messages[{i}]"))
                for i, m in enumerate(self.messages)]

    def tool_use(self) -> ToolUse | None:
        return ToolUse.of(self.tools, self.tool_choice, self.parallel_tool_calls)


def _structured(field: str, **kind) -> StructuredOutputs:
    """StructuredOutputs(**kind), its ValueError naming the request's field."""
    try:
        return StructuredOutputs(**kind)
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from None


def split_prompts(prompt: object) -> list[str] | list[list[int]]:
    """A completions `prompt` (a string, a list of strings, a list of token ids, or a list of
    token id lists) as a list of prompts; ValueError for any other shape."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(_is_token_id(t) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
            return prompt
    raise ValueError("prompt must be a string, a list of strings, a list of token ids or a "
                     "list of token id lists, none of them empty")


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _or(value, default):
    return default if value is None else value


class TokenizeRequest(BaseModel):
    """POST /tokenize, vLLM's two forms: `prompt` (text, with the tokenizer's special tokens
    unless add_special_tokens is false) or `messages` (through the chat template, as
    /v1/chat/completions renders them)."""

    model_config = STRICT

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must hold at least one message")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be "
                             "true")

    def conversation(self) -> list[dict[str, str]]:
        return [m.for_template(f"messages[{i}]") for i, m in enumerate(self.messages or [])]


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids back to text."""

    model_config = STRICT

    model: str | None = None
    tokens: list[int]

    def check_supported(self) -> None:
        pass
