"""Tool calling on /v1/chat/completions: which tools a request offers and how it lets the model use
them (tool_choice), the grammar that forces a call, and the parsers that find calls in what the
model wrote.

- `none`: the tools are not shown to the model, and its output is plain content.
- `auto` (the default with tools): the tools go to the chat template (transformers'
  `apply_chat_template(tools=...)`), the model writes in its family's own format, and the
  request's parser (`--tool-call-parser`, or chosen from the chat template) takes the calls out
  of the text. The parsers:
    hermes       Hermes / Qwen 2.5 and 3:  <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    llama3_json  Llama 3.1 - 3.3:          {"name": ..., "parameters": {...}} (after
                                           <|python_tag|>, several joined by ";")
    mistral      Mistral:                  [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
- `required` and a named function: the output is forced by the structured-output machinery
  (engine/structured_output.py), as vLLM does: for a named function, its arguments as JSON valid
  against the function's `parameters`; for `required`, a JSON list of one or more
  {"name", "parameters"} objects, each valid against its function's schema. The arguments then
  always validate, whatever the model's size or format.

A choice with calls answers `message.tool_calls` (ids `call_<hex>`, arguments as JSON text) and
`finish_reason: "tool_calls"`. Streamed, the content before a call goes out as it comes (text that
may be the start of a call marker is held back), and each call goes out whole, as one delta, when
the choice finishes.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from fastgen.config import StructuredOutputs

TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _calls_from(objects: list) -> list[ToolCall] | None:
    """Objects of {"name", "arguments" | "parameters"} as calls; None when one is not one."""
    calls = []
    for item in objects:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append(ToolCall(item["name"], _arguments(arguments)))
    return calls


class ToolParser(ABC):
    """Takes a model's tool calls out of its text."""

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]] = ()  # text that opens a call anywhere in the output
    starts_with_json: ClassVar[bool] = False  # a call is an output starting with JSON

    @abstractmethod
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output; no calls (and the text as content) when it holds
        none or they do not parse."""


class HermesParser(ToolParser):
    name, markers = "hermes", ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls = []
        for match in self._CALL.finditer(text):
            try:
                parsed = _calls_from([json.loads(match.group(1))])
            except ValueError:
                parsed = None
            if parsed is None:
                return text, []
            calls += parsed
        content = self._CALL.sub("", text).strip() if calls else text
        return content or None, calls


class JsonObjectsParser(ToolParser):
    """Llama 3's: the output is one or more JSON call objects (";" between them)."""

    name, starts_with_json = "llama3_json", True
    prefix = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self.prefix).strip()
        objects, decoder, position = [], json.JSONDecoder(), 0
        try:
            while position < len(body):
                value, position = decoder.raw_decode(body, position)
                objects.append(value)
                while position < len(body) and body[position] in "; \n\t":
                    position += 1
        except ValueError:
            return text, []
        calls = _calls_from(objects) if objects else None
        return (None, calls) if calls else (text, [])


class MistralParser(ToolParser):
    name, markers, starts_with_json = "mistral", ("[TOOL_CALLS]",), True

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        before, marker, after = text.partition("[TOOL_CALLS]")
        body = after if marker else before
        try:
            value, _ = json.JSONDecoder().raw_decode(body.strip())
        except ValueError:
            return text, []
        calls = _calls_from(value if isinstance(value, list) else [value])
        if not calls:
            return text, []
        return (before.strip() or None) if marker else None, calls


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser,
                                        "llama3_json": JsonObjectsParser,
                                        "mistral": MistralParser}


def parser_for(name: str, chat_template: str | None) -> ToolParser:
    """The parser `name` names, or for "auto" the one the chat template's own markers point to
    (hermes when it shows none)."""
    if name != "auto":
        return PARSERS[name]()
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or "python_tag" in template:
        return JsonObjectsParser()
    return HermesParser()


# What a request asks for.

@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools and tool_choice, checked. mode: none, auto, required or named
    (function: the name)."""

    tools: list[dict]  # OpenAI's {"type": "function", "function": {...}}, for the template
    mode: str
    function: str | None = None
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[dict] | None, tool_choice: Any,
           parallel_tool_calls: bool | None) -> ToolUse | None:
        """None without tools (and tool_choice none or absent); ValueError for a bad tool or
        choice."""
        if not tools:
            if tool_choice not in (None, "none"):
                raise ValueError("tool_choice needs tools")
            return None
        names = []
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                    or not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError(f"tools[{i}]: a tool is {{\"type\": \"function\", \"function\": "
                                 f"{{\"name\": ..., \"parameters\": {{...}}}}}}")
            if not isinstance(function.get("parameters", {}), dict):
                raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
            names.append(function["name"])
        parallel = parallel_tool_calls is not False
        if tool_choice is None or tool_choice in ("auto", "none", "required"):
            return cls(tools, tool_choice or "auto", None, parallel)
        if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            name = tool_choice["function"].get("name")
            if name not in names:
                raise ValueError(f"tool_choice names the function {name!r}, which is not among "
                                 f"the tools ({', '.join(names)})")
            return cls(tools, "named", name, parallel)
        raise ValueError("tool_choice must be none, auto, required or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}")

    @property
    def shown(self) -> list[dict] | None:
        """The tools as the chat template gets them (none for tool_choice none)."""
        return None if self.mode == "none" else self.tools

    def _parameters(self, name: str) -> dict:
        function = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return function.get("parameters") or {"type": "object"}

    def constraint(self) -> StructuredOutputs | None:
        """The structured output forcing the call (required and named), else None."""
        if self.mode == "named":
            return StructuredOutputs(json=self._parameters(self.function))
        if self.mode != "required":
            return None
        calls = [{"type": "object", "additionalProperties": False,
                  "required": ["name", "parameters"],
                  "properties": {"name": {"const": t["function"]["name"]},
                                 "parameters": self._parameters(t["function"]["name"])}}
                 for t in self.tools]
        schema = {"type": "array", "minItems": 1,
                  "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputs(json=schema)

    def parse(self, text: str, parser: ToolParser) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output."""
        if self.mode == "named":
            return None, [ToolCall(self.function, text)]
        if self.mode == "required":
            try:
                calls = _calls_from(json.loads(text))
            except ValueError:
                calls = None
            return (None, calls) if calls else (text, [])
        if self.mode == "none":
            return text, []
        return parser.parse(text)

    def holds_back(self, text: str, parser: ToolParser) -> int:
        """How much of a streamed output so far (text) is not content yet: all of it once a
        call has begun (or when the output is forced), else the tail that could begin one."""
        if self.mode in ("named", "required"):
            return len(text)
        if self.mode == "none":
            return 0
        if parser.starts_with_json and text.lstrip()[:1] in ("{", "[", "<") or (
                parser.starts_with_json and not text.strip()):
            return len(text)
        for marker in parser.markers:
            at = text.find(marker)
            if at >= 0:
                return len(text) - at
        longest = 0
        for marker in parser.markers:
            for size in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:size]):
                    longest = max(longest, size)
                    break
        return longest


def message_for_template(message: dict) -> dict:
    """An assistant message's tool_calls with their arguments as objects, which is what chat
    templates expect (they write them out with tojson); text that is not JSON stays text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    converted = []
    for call in calls:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments)
            except ValueError:
                pass
        converted.append({**call, "function": function})
    return {**message, "tool_calls": converted}
