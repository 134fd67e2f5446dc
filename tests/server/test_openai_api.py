"""The OpenAI-compatible routes through the official `openai` client against a real server on
loopback (tiny random Llama): answers equal LLM.generate / LLM.chat on the same model, streaming
equals the whole answer, n and seed, stop, logprobs equal the engine's, concurrent requests,
every bad request a 400 (the server keeps serving), a full queue a 503, and a client that
disconnects frees its KV blocks."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from fastgen import SamplingParams
from fastgen.server.protocol import MAX_N
from tests.engine.test_continuous_batching import make_llm
from tests.server.conftest import MODEL_NAME

PROMPTS = ["The capital of France is", "Once upon a time", "Numbers: 0 1 2", "def hello():"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
CONTEXT = 256  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def offline(tiny_model_path):
    """The same model run offline, as the reference."""
    return make_llm(tiny_model_path)


VLLM_EXTRAS = ("ignore_eos", "top_k", "min_p", "repetition_penalty", "stop_token_ids")


def _with_extras(kwargs: dict) -> dict:
    """The openai client takes vLLM's sampling extras only through extra_body."""
    extra = {k: kwargs.pop(k) for k in VLLM_EXTRAS if k in kwargs}
    if extra:
        kwargs["extra_body"] = {**kwargs.get("extra_body", {}), **extra}
    kwargs.setdefault("model", MODEL_NAME)
    return kwargs


def complete(client, **kwargs):
    return client.completions.create(**_with_extras(kwargs))


def chat(client, content="What is the capital of France?", **kwargs):
    return client.chat.completions.create(messages=[{"role": "user", "content": content}],
                                          **_with_extras(kwargs))


# Answers equal the offline engine's.

def test_completion_equals_llm_generate(client, offline):
    expected = offline.generate(PROMPTS, GREEDY, use_tqdm=False)
    result = complete(client, prompt=PROMPTS[0], max_tokens=12, temperature=0, ignore_eos=True)
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert result.model == MODEL_NAME
    [choice] = result.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, expected[0].text, "length")
    prompt_tokens = len(offline.tokenizer.encode(PROMPTS[0]))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens,
            result.usage.total_tokens) == (prompt_tokens, 12, prompt_tokens + 12)

    batch = complete(client, prompt=PROMPTS, max_tokens=12, temperature=0, ignore_eos=True)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [o.text for o in expected]
    assert batch.usage.prompt_tokens == sum(len(offline.tokenizer.encode(p)) for p in PROMPTS)
    assert batch.usage.completion_tokens == 4 * 12

    ids = [offline.tokenizer.encode(p) for p in PROMPTS[:2]]
    by_ids = complete(client, prompt=ids, max_tokens=12, temperature=0, ignore_eos=True)
    assert [c.text for c in by_ids.choices] == [o.text for o in expected[:2]]
    one = complete(client, prompt=ids[1], max_tokens=12, temperature=0, ignore_eos=True)
    assert one.choices[0].text == expected[1].text


def test_chat_equals_llm_chat(client, offline):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    [expected] = offline.chat(messages, SamplingParams(max_tokens=10, temperature=0),
                              use_tqdm=False)
    result = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                            max_completion_tokens=10, temperature=0)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    [choice] = result.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason.value
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert result.usage.completion_tokens == len(expected.token_ids)
    # Text content parts and the "developer" role (OpenAI's new "system") render the same.
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
             messages[1]]
    again = client.chat.completions.create(model=MODEL_NAME, messages=parts, max_tokens=10,
                                           temperature=0)
    assert again.choices[0].message.content == expected.text


def test_chat_without_max_tokens_may_fill_the_context(client):
    result = chat(client, temperature=0, ignore_eos=True)
    assert result.choices[0].finish_reason == "length"
    assert result.usage.total_tokens == CONTEXT


# Streaming.

def test_streamed_completion_equals_the_whole_answer(client, server):
    kwargs = {"prompt": PROMPTS, "max_tokens": 10, "temperature": 0, "n": 2, "ignore_eos": True}
    whole = complete(client, **kwargs)
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True},
                           **kwargs))
    *choice_chunks, usage_chunk = chunks
    texts, reasons = {}, {}
    for chunk in choice_chunks:
        [choice] = chunk.choices
        assert choice.index not in reasons  # nothing after a choice's finish_reason
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason is not None:
            reasons[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {i: "length" for i in range(8)}
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert len({c.id for c in chunks}) == 1

    raw = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3,
                                                           "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_streamed_chat_equals_the_whole_answer(client):
    whole = chat(client, max_tokens=12, temperature=0)
    chunks = list(chat(client, max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)  # no include_usage


# n, seed, stop.

def test_n_samples_with_a_seed_are_reproducible(client):
    kwargs = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 1234}
    first, second = complete(client, **kwargs), complete(client, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices]
    assert len(set(texts)) > 1  # sample i draws with seed + i
    streamed = {}
    for chunk in complete(client, stream=True, **kwargs):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == texts
    answers = chat(client, max_tokens=6, n=2, seed=5, ignore_eos=True)
    assert [c.index for c in answers.choices] == [0, 1]
    assert answers.usage.completion_tokens == 12
    assert [c.message.content for c in answers.choices] == \
        [c.message.content for c in chat(client, max_tokens=6, n=2, seed=5,
                                         ignore_eos=True).choices]


def test_stop_strings_and_stop_token_ids(client, offline):
    prompt = PROMPTS[0]
    free = offline.generate([prompt], SamplingParams(max_tokens=20, temperature=0,
                                                     ignore_eos=True), use_tqdm=False)[0]
    stop = free.text[6:8]
    cut = complete(client, prompt=prompt, max_tokens=20, temperature=0, stop=stop,
                   ignore_eos=True)
    assert cut.choices[0].text == free.text[:free.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    stop_id = free.token_ids[5]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                            stop_token_ids=[stop_id], stop=["\n\n\n"])
    [expected] = offline.generate([prompt], params, use_tqdm=False)
    result = complete(client, prompt=prompt, max_tokens=20, temperature=0, stop=["\n\n\n"],
                      ignore_eos=True, stop_token_ids=[stop_id])
    assert result.choices[0].text == expected.text
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens == len(expected.token_ids)


# Logprobs.

def test_completion_logprobs_equal_the_engines(client, offline):
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    [expected] = offline.generate([PROMPTS[2]], params, use_tqdm=False)
    result = complete(client, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3,
                      ignore_eos=True)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    for token_id, entry, value, top in zip(expected.token_ids, expected.logprobs,
                                           logprobs.token_logprobs, logprobs.top_logprobs):
        assert value == pytest.approx(entry[token_id], abs=1e-4)
        assert list(top.values()) == sorted(top.values(), reverse=True)
        assert len(top) <= 3 and max(top.values()) == pytest.approx(value, abs=1e-4)  # greedy
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)

    streamed = []
    for chunk in complete(client, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3,
                          stream=True, ignore_eos=True):
        if chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(logprobs.token_logprobs, abs=1e-4)


def test_echo_scores_the_prompt(client, offline):
    """echo + logprobs + max_tokens 0: how evaluation harnesses score a text."""
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    [expected] = offline.generate([PROMPTS[0]], params, use_tqdm=False)
    result = complete(client, prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=2)
    [choice] = result.choices
    assert choice.text == PROMPTS[0]
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    ids = expected.prompt_token_ids
    assert len(logprobs.tokens) == len(ids)
    assert "".join(logprobs.tokens) == PROMPTS[0]
    for token_id, entry, value in zip(ids[1:], expected.prompt_logprobs[1:],
                                      logprobs.token_logprobs[1:]):
        assert value == pytest.approx(entry[token_id], abs=1e-4)
    echoed = complete(client, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    plain = complete(client, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert echoed.choices[0].text == PROMPTS[0] + plain.choices[0].text


def test_chat_logprobs_equal_the_engines(client, offline):
    messages = [{"role": "user", "content": "Hi"}]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    [expected] = offline.chat(messages, params, use_tqdm=False)
    result = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6,
                                            temperature=0, logprobs=True, top_logprobs=2,
                                            extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids)
    for token_id, entry, item in zip(expected.token_ids, expected.logprobs, content):
        assert item.logprob == pytest.approx(entry[token_id], abs=1e-4)
        assert len(item.top_logprobs) == 2
        tops = [t.logprob for t in item.top_logprobs]
        assert tops == sorted(tops, reverse=True) and tops[0] == pytest.approx(item.logprob)
        assert bytes(item.bytes).decode(errors="replace") == item.token
    # A token's bytes may be part of a character; together they are the text.
    assert b"".join(bytes(i.bytes) for i in content).decode(errors="replace") == \
        result.choices[0].message.content
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                                max_tokens=6, temperature=0, logprobs=True,
                                                stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices[0].logprobs is not None:
            streamed += [i.logprob for i in chunk.choices[0].logprobs.content]
    # A repeated prompt is read from the prefix cache: the same values to float rounding.
    assert streamed == pytest.approx([i.logprob for i in content], abs=1e-4)


# Concurrency.

def test_concurrent_requests_match_single_requests(client):
    jobs = [(PROMPTS[i % 4], 6 + i) for i in range(8)]
    alone = [complete(client, prompt=p, max_tokens=m, temperature=0).choices[0].text
             for p, m in jobs]

    def one(job):
        prompt, max_tokens = job
        if max_tokens % 2:
            return complete(client, prompt=prompt, max_tokens=max_tokens,
                            temperature=0).choices[0].text
        return "".join(c.choices[0].text for c in complete(
            client, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True))

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, jobs)) == alone


# Bad requests: a 400 each, and the server goes on serving.

BAD_COMPLETIONS = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10_000}, "maximum context length is 256"),
    ({"prompt": "word " * 300}, "maximum context length is 256"),
    ({"prompt": ""}, "empty"),
    ({"prompt": []}, "prompt must be"),
    ({"prompt": [[1, 2], []]}, "prompt must be"),
    ({"prompt": [1, 10_000_000]}, "outside the vocabulary"),
    ({"n": MAX_N + 1}, f"at most {MAX_N}"),
    ({"n": 0}, "n must be at least 1"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0}, "top_p"),
    ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"stop": [""]}, "stop"),
    ({"seed": 2 ** 70}, "seed"),
    ({"extra_body": {"top_k": -5}}, "top_k"),
    ({"extra_body": {"min_p": 2}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"logit_bias": {"five": 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {"5": 150}}, "logit_bias values must be in [-100, 100]"),
    ({"logit_bias": {"100000": 1}}, "outside the vocabulary"),
    ({"best_of": 1, "n": 2}, "best_of must be at least n"),
    ({"best_of": MAX_N + 1}, f"best_of must be at most {MAX_N}"),
    ({"best_of": 3, "stream": True}, "cannot be streamed"),
    ({"extra_body": {"guided_regex": "(("}}, "invalid structured output (regex)"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice"),
    ({"extra_body": {"guided_grammar": "root ::= ("}}, "invalid structured output (grammar)"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "exactly one"),
]


@pytest.mark.parametrize("kwargs, message", BAD_COMPLETIONS,
                         ids=[m for _, m in BAD_COMPLETIONS])
def test_bad_completion_requests_are_400(client, kwargs, message):
    kwargs = {"prompt": "Hi", **kwargs}
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, **kwargs)
    assert error.value.status_code == 400
    assert message in error.value.body["message"]


BAD_CHATS = [
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "1", "function": {
        "name": "f", "arguments": "{}"}}]}]}, "only assistant messages make tool calls"),
    ({"messages": [{"role": "user"}]}, "needs content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x"}}]}]}, "only text"),
    ({"messages": [{"content": "hi"}]}, "role"),
    ({"max_tokens": 0}, "at least 1"),
    ({"max_completion_tokens": 500}, "maximum context length is 256"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "maximum context length"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "not among the tools"),
    ({"tools": [{"type": "function"}]}, "tools[0]: a tool is"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
     "parameters must be a JSON schema object"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
     "tool_choice must be"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"response_format": {"type": "xml"}}, "unknown type 'xml'"),
    ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "nonsense"}}}}, "Invalid type: nonsense"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}},
     "one structured output, not several: response_format, guided_regex"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CHATS, ids=[m for _, m in BAD_CHATS])
def test_bad_chat_requests_are_400(client, kwargs, message):
    kwargs = {"messages": [{"role": "user", "content": "Hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL_NAME, **kwargs)
    assert message in error.value.body["message"]


# Structured outputs, logit_bias and best_of.

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


def test_json_schema_response_format_validates_on_both_routes(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    out = chat(client, "Describe someone", response_format=fmt, n=3, seed=1, temperature=1.0,
               max_tokens=80)
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    completion = complete(client, prompt="A person:", extra_body={"response_format": fmt},
                          max_tokens=80, seed=2, temperature=1.0)  # vLLM's extra, there
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)
    plain = chat(client, "Describe someone", response_format={"type": "json_object"}, seed=3,
                 temperature=1.0, max_tokens=120)
    if plain.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(plain.choices[0].message.content), dict)
    else:
        assert plain.choices[0].message.content.startswith("{")


def test_vllm_guided_fields_and_streaming(client):
    import re

    out = complete(client, prompt="Code:", max_tokens=20, seed=4, temperature=1.0,
                   extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"})
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", out.choices[0].text)
    options = ["yes", "no", "maybe"]
    for field in ({"guided_choice": options}, {"structured_outputs": {"choice": options}}):
        out = chat(client, "Well?", n=4, seed=5, temperature=1.0, extra_body=field)
        assert {c.message.content for c in out.choices} <= set(options)
    grammar = 'root ::= "The answer is " [0-9]+ "."'
    stream = chat(client, "Answer", stream=True, seed=6, temperature=1.0, max_tokens=30,
                  extra_body={"guided_grammar": grammar})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert re.fullmatch(r"The answer is [0-9]+\.", text) or (
        re.fullmatch(r"The answer is [0-9]*", text)), text
    # Stop strings still stop a constrained output.
    out = complete(client, prompt="Code:", max_tokens=20, seed=4, temperature=1.0, stop=["-"],
                   extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"})
    assert re.fullmatch("[A-Z]{2}", out.choices[0].text) and out.choices[0].finish_reason == "stop"


def test_logit_bias_forces_and_bans(client, server, offline):
    forced = server.tokenizer.encode(" capital")[-1]
    out = complete(client, prompt="Hi", max_tokens=3, temperature=1.0, seed=0, ignore_eos=True,
                   logit_bias={str(forced): 100})
    assert out.choices[0].text == server.tokenizer.decode([forced] * 3)
    [greedy] = offline.generate(["Hi"], SamplingParams(max_tokens=1, temperature=0,
                                                       ignore_eos=True), use_tqdm=False)
    first = greedy.outputs[0].token_ids[0]
    banned = complete(client, prompt="Hi", max_tokens=1, temperature=0, ignore_eos=True,
                      logprobs=1, logit_bias={str(first): -100})
    assert banned.choices[0].text != greedy.outputs[0].text
    # logprobs stay the raw model's: the banned token is still the likeliest there.
    assert list(banned.choices[0].logprobs.top_logprobs[0]) == [greedy.outputs[0].text]


def test_best_of_returns_the_likeliest_samples(client):
    kwargs = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.0, "seed": 11}
    pool = complete(client, n=5, logprobs=0, **kwargs)  # what best_of 5 draws (same seeds)
    scores = sorted((sum(c.logprobs.token_logprobs), c.text) for c in pool.choices)[::-1]
    best = complete(client, n=2, best_of=5, **kwargs)
    assert [c.text for c in best.choices] == [text for _, text in scores[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert all(c.logprobs is None for c in best.choices)
    assert best.usage.completion_tokens == pool.usage.completion_tokens  # all five generated
    with_logprobs = complete(client, n=1, best_of=5, logprobs=1, **kwargs)
    assert with_logprobs.choices[0].text == scores[0][1]
    assert sum(with_logprobs.choices[0].logprobs.token_logprobs) == pytest.approx(scores[0][0])


# Types are strict: no coercion of booleans, floats or strings into ints and booleans.
WRONG_TYPES = [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "Hi", "n": 3.0}, "n"),
    ("/v1/completions", {"prompt": "Hi", "echo": 1}, "echo"),
    ("/v1/completions", {"prompt": "Hi", "seed": "7"}, "seed"),
    ("/v1/chat/completions", {"max_tokens": 2.0}, "max_tokens"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"stream": "true"}, "stream"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"temperature": True}, "temperature"),
]


@pytest.mark.parametrize("path, body, field", WRONG_TYPES,
                         ids=[f"{p.split('/')[-1]}-{f}" for p, _, f in WRONG_TYPES])
def test_wrong_types_are_400_not_coerced(server, path, body, field):
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "Hi"}], **body}
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(field), error


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", b'{"prompt": "\\ud800abc"}', "prompt"),
    ("/v1/completions", b'{"prompt": ["fine", "\\udfffx"]}', "prompt[1]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", '
                             b'"text": "\\ud83d"}]}]}', "messages[0].content[0].text"),
    ("/v1/completions", b'{"prompt": "Hi", "stop": ["\\ud800"]}', "stop[0]"),
])
def test_unpaired_surrogates_are_400s_naming_the_field(server, path, body, field):
    response = httpx.post(f"{server.url}{path}", content=body,
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and "surrogate" in error["message"]
    assert "message" not in response.json()  # Megatron's extra key is for its routes only


@pytest.mark.parametrize("body", [b"{", b"not json", b"[1, 2]", b"\xff\xfe", b"",
                                  b'{"prompt": "Hi", "max_tokens": NaN}',
                                  b'{"prompt": "Hi", "temperature": Infinity}',
                                  b'{"prompt": {"text": "Hi"}}'])
def test_malformed_bodies_are_400(server, body):
    response = httpx.post(f"{server.url}/v1/completions", content=body,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError" and error["message"]


def test_unknown_model_is_404_and_the_server_still_serves(client, server):
    with pytest.raises(openai.NotFoundError) as error:
        complete(client, model="gpt-4", prompt="Hi", max_tokens=2)
    assert "'gpt-4' does not exist" in error.value.body["message"]
    assert MODEL_NAME in error.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        chat(client, model="gpt-4")
    # Extra fields clients send are ignored; the model may be left out (the served one).
    ok = httpx.post(f"{server.url}/v1/completions",
                    json={"prompt": "Hi", "max_tokens": 2, "user": "u", "metadata": {"a": 1}})
    assert ok.status_code == 200 and ok.json()["model"] == MODEL_NAME
    assert server.llm_engine.num_unfinished_requests == 0


# Load: a full queue, and clients that go away. A slow model (a sleep per engine step) keeps
# requests in flight long enough to catch them there.

@pytest.fixture(scope="module")
def slow(start_server):
    return start_server(step_delay=0.01, max_num_seqs=1, max_waiting_requests=1)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def idle(server) -> bool:
    llm_engine = server.llm_engine
    blocks = llm_engine.block_manager
    return llm_engine.num_unfinished_requests == 0 and \
        blocks.num_free_blocks == blocks.num_blocks


def aborted(server) -> int:
    return server.llm_engine.stats.requests_finished.get("abort", 0)


LONG = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}


def test_a_full_queue_answers_503(slow):
    client = openai.OpenAI(base_url=slow.url + "/v1", api_key="x", max_retries=0)
    engine = slow.engine
    with httpx.stream("POST", f"{slow.url}/v1/completions", json={**LONG, "stream": True},
                      timeout=30) as running:
        lines = running.iter_lines()  # kept: closing it would close the connection
        next(lines)  # admitted: the one running sequence (max_num_seqs=1)
        waiting = threading.Thread(target=complete, args=(client,),
                                   kwargs={"prompt": "Hi", "max_tokens": 2})
        waiting.start()
        wait_until(lambda: engine.num_waiting == 1)
        with pytest.raises(openai.InternalServerError) as error:
            complete(client, prompt="Hi", max_tokens=2)
        assert error.value.status_code == 503
        assert error.value.body["type"] == "ServiceUnavailableError"
        burst = []

        def one():
            try:
                complete(client, prompt="Hi", max_tokens=2)
                burst.append(200)
            except openai.APIStatusError as e:
                burst.append(e.status_code)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert burst == [503] * 6
    waiting.join(timeout=30)
    wait_until(lambda: idle(slow))
    assert complete(client, prompt="Hi", max_tokens=2).choices[0].finish_reason == "length"


def test_a_client_leaving_a_stream_frees_its_blocks(slow):
    before = aborted(slow)
    with httpx.stream("POST", f"{slow.url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "Tell me a story"}], "stream": True,
            "ignore_eos": True}) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines)[len("data: "):])["choices"][0]["delta"]["role"] == \
            "assistant"
        next(line for line in lines if '"content"' in line)  # generating now
        assert not idle(slow)
    wait_until(lambda: idle(slow))
    assert aborted(slow) == before + 1


def test_a_client_leaving_a_non_streaming_request_frees_its_blocks(slow):
    before = aborted(slow)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow.url}/v1/completions", json=LONG, timeout=0.5)
    wait_until(lambda: idle(slow))
    assert aborted(slow) == before + 1
