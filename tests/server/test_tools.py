"""Tool calling on /v1/chat/completions with the official openai client: a two-turn tool loop
(call, tool result, final answer) with a forced (`required`) call on the tiny model and on the
real default model, a named function, streamed calls, `auto` with each family's parser reading a
call the model writes (the output held to that text by a guided choice, since a random model
writes none), and the parsers and the streaming hold-back on their own."""

import json

import jsonschema
import openai
import pytest

from fastgen.server.tools import HermesParser, JsonObjectsParser, MistralParser, ToolUse
from fastgen.tokenization import render_chat_prompt
from tests.server.conftest import MODEL_NAME

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False,
                                       "required": ["zone"],
                                       "properties": {"zone": {"type": "string",
                                                               "maxLength": 8}}}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def check_calls(message) -> list:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return message.tool_calls


def tool_loop(client, model: str, **kwargs) -> str:
    """Turn 1: a forced call. Turn 2: its result goes back as a tool message; the model answers."""
    first = client.chat.completions.create(model=model, messages=QUESTION, tools=[WEATHER, TIME],
                                           tool_choice="required", parallel_tool_calls=False,
                                           max_tokens=150, **kwargs)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = check_calls(choice.message)
    messages = [*QUESTION, choice.message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": call.id, "content": json.dumps(
        {"temperature": 21, "sky": "clear"})} for call in calls]
    final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="none", max_tokens=24, **kwargs)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length")
    return final.choices[0].message.content


def test_a_two_turn_tool_loop_on_the_tiny_model(client):
    assert isinstance(tool_loop(client, MODEL_NAME, temperature=1.0, seed=3), str)


def test_a_named_function_is_always_called_with_valid_arguments(client):
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, tools=[WEATHER, TIME], n=3, seed=4,
        temperature=1.0, max_tokens=150,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    for choice in out.choices:
        [call] = check_calls(choice.message)
        assert call.function.name == "get_time" and choice.finish_reason == "tool_calls"
        assert choice.message.content is None


def test_parallel_tool_calls_false_makes_one_call(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, tools=[WEATHER],
                                         tool_choice="required", parallel_tool_calls=False,
                                         n=4, seed=5, temperature=1.0, max_tokens=150)
    assert all(len(check_calls(c.message)) == 1 for c in out.choices)


def test_streamed_calls_arrive_whole_at_the_end(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION,
                                            tools=[WEATHER], tool_choice="required", seed=6,
                                            temperature=1.0, max_tokens=150, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    assert not any(d.content for d in deltas)  # a forced call is no content
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])


HERMES_OUTPUT = ('Let me look. <tool_call>{"name": "get_weather", "arguments": '
                 '{"city": "Paris"}}</tool_call>')


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_the_call_the_model_writes(client, stream):
    """The tiny model's template shows no tool markers, so auto picks the Hermes parser."""
    kwargs = dict(model=MODEL_NAME, messages=QUESTION, tools=[WEATHER], max_tokens=150,
                  extra_body={"guided_choice": [HERMES_OUTPUT]})
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        [call] = check_calls(choice.message)
        assert choice.message.content == "Let me look." and choice.finish_reason == "tool_calls"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        return
    deltas = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True)
              if c.choices]
    content = "".join(d.delta.content or "" for d in deltas)
    calls = [call for d in deltas for call in d.delta.tool_calls or []]
    assert content.strip() == "Let me look." and "<tool" not in content
    assert [c.function.name for c in calls] == ["get_weather"]
    assert deltas[-1].finish_reason == "tool_calls"
    # Plain text in auto mode stays content.
    plain = client.chat.completions.create(**{**kwargs, "extra_body": {
        "guided_choice": ["Sunny, I think."]}}).choices[0]
    assert plain.message.content == "Sunny, I think." and plain.message.tool_calls is None


@pytest.mark.slow
def test_the_default_model_makes_a_forced_call(start_server):
    from fastgen.loader.hub import default_model_dir

    server = start_server(model_path=default_model_dir())
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
    answer = tool_loop(client, MODEL_NAME, temperature=0)
    assert answer  # the real model says something about the weather it was given


# The parsers and the streaming hold-back, on their own.

def test_hermes_parser():
    content, calls = HermesParser().parse(
        'Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("a", {"x": 1}), ("b", {})]
    assert HermesParser().parse("no calls here") == ("no calls here", [])
    assert HermesParser().parse("<tool_call>{broken</tool_call>")[1] == []
    # A call cut off before its closing tag still counts when its JSON is whole.
    assert HermesParser().parse('<tool_call>{"name": "a", "arguments": {}}')[1][0].name == "a"


def test_llama3_and_mistral_parsers():
    content, calls = JsonObjectsParser().parse(
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}')
    assert content is None and [c.name for c in calls] == ["a", "b"]
    assert json.loads(calls[0].arguments) == {"x": 1}
    assert JsonObjectsParser().parse("Paris is sunny.") == ("Paris is sunny.", [])
    assert JsonObjectsParser().parse('{"not": "a call"}')[1] == []
    content, calls = MistralParser().parse('[TOOL_CALLS][{"name": "a", "arguments": {"y": 2}}]')
    assert content is None and calls[0].name == "a" and json.loads(calls[0].arguments) == {"y": 2}
    assert MistralParser().parse('[{"name": "a", "arguments": {}}]')[1][0].name == "a"


def test_streaming_holds_back_what_may_begin_a_call():
    auto = ToolUse.of([WEATHER], "auto", None)
    hermes = HermesParser()
    assert auto.holds_back("Hello <tool", hermes) == len("<tool")
    assert auto.holds_back("Hello <b>", hermes) == 0
    assert auto.holds_back('Hi <tool_call>{"na', hermes) == len('<tool_call>{"na')
    llama = JsonObjectsParser()
    assert auto.holds_back('{"name"', llama) == len('{"name"')
    assert auto.holds_back("Sunny", llama) == 0
    required = ToolUse.of([WEATHER], "required", None)
    assert required.holds_back("[{", hermes) == 2


def test_tools_reach_a_template_that_renders_them(server):
    template = ("{% for t in tools %}TOOL {{ t.function.name }};{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }}"
                "({{ c.function.arguments.city }}){% endfor %};{% endfor %}")
    tokenizer = server.tokenizer
    saved, tokenizer.chat_template = tokenizer.chat_template, template
    try:
        call = {"id": "1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        text = render_chat_prompt(tokenizer, [*QUESTION, {"role": "assistant", "content": "",
                                                          "tool_calls": [call]}],
                                  [WEATHER, TIME], add_generation_prompt=False).text
    finally:
        tokenizer.chat_template = saved
    assert text.startswith("TOOL get_weather;TOOL get_time;")
    assert "CALL get_weather(Paris)" in text
