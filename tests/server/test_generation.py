"""The Generation every route runs its engine requests through (server/generation.py), driven
directly over a real AsyncLLMEngine on the tiny model: DELTA outputs added up equal the offline
answer and are timed per prompt; a client that disconnects gets None and every engine request is
aborted, its KV blocks freed; a refused prompt cancels those queued before it and records nothing;
and both the OpenAI routes and Megatron's go through it."""

import asyncio
import time

import httpx
import pytest

from fastgen import SamplingParams
from fastgen.engine.async_engine import AsyncLLMEngine
from fastgen.server.generation import CLIENT_CLOSED_REQUEST, Generation, Prompt
from fastgen.server.metrics import ServerMetrics
from tests.engine.test_continuous_batching import make_llm
from tests.server.conftest import slow_down

PROMPTS = ["The capital of France is", "Once upon a time"]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def offline(tiny_model_path):
    return make_llm(tiny_model_path)


def running_engine(tiny_model_path, step_delay: float = 0.0) -> AsyncLLMEngine:
    llm = make_llm(tiny_model_path)
    if step_delay:
        slow_down(llm, step_delay)
    engine = AsyncLLMEngine(llm.engine)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    engine = running_engine(tiny_model_path)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def slow_engine(tiny_model_path):
    engine = running_engine(tiny_model_path, step_delay=0.01)
    yield engine
    engine.stop()


def prompts(tokenizer) -> list[Prompt]:
    return [Prompt(p, tokenizer.encode(p)) for p in PROMPTS]


def ended(metrics: ServerMetrics, endpoint: str, reason: str) -> float:
    return metrics.registry.get_sample_value(
        "fastgen:requests_total", {"endpoint": endpoint, "finished_reason": reason}) or 0.0


async def until_idle(engine: AsyncLLMEngine, timeout: float = 10.0) -> None:
    """Waits, on the event loop (which must outlive the engine's last output), until the
    engine holds no request and no KV block."""
    llm_engine, deadline = engine.engine, time.monotonic() + timeout
    while engine.num_waiting or llm_engine.has_unfinished() or llm_engine.kv_cache_usage > 0:
        assert time.monotonic() < deadline, "the engine kept requests"
        await asyncio.sleep(0.01)


async def never_disconnects() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


def test_outputs_add_up_to_the_offline_answer(engine, offline):
    expected = offline.generate(PROMPTS, GREEDY, use_tqdm=False)
    metrics = ServerMetrics(engine)

    async def run():
        generation = Generation(engine, metrics, "test", prompts(engine.tokenizer),
                                [GREEDY] * len(PROMPTS), time.monotonic())
        seen = [0] * len(PROMPTS)
        async for index, out in generation.outputs():
            seen[index] += 1
            assert generation.finals[index].token_ids[-len(out.token_ids):] == out.token_ids
        generation.close()
        return generation, seen

    generation, seen = asyncio.run(run())
    assert [f.text for f in generation.finals] == [e.text for e in expected]
    assert [f.token_ids for f in generation.finals] == [e.token_ids for e in expected]
    assert [f.prompt for f in generation.finals] == PROMPTS
    assert seen == [8, 8]  # a DELTA output per step, one token each
    assert generation.num_prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert generation.num_output_tokens == 16
    assert ended(metrics, "test", "length") == 2
    assert ended(metrics, "test", "abort") == 0  # close() after the end aborts nothing


def test_finish_returns_every_final_output_in_order(engine, offline):
    params = [GREEDY, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)]
    expected = offline.generate(PROMPTS, params, use_tqdm=False)

    async def run():
        generation = Generation(engine, ServerMetrics(engine), "test",
                                prompts(engine.tokenizer), params, time.monotonic())
        finals = await generation.finish(never_disconnects)
        await until_idle(engine)
        return finals

    finals = asyncio.run(run())
    assert [f.token_ids for f in finals] == [e.token_ids for e in expected]


def test_a_client_that_disconnects_frees_the_engines_requests(slow_engine):
    llm_engine = slow_engine.engine
    aborted = llm_engine.stats.requests_finished.get("abort", 0)
    metrics = ServerMetrics(slow_engine)

    async def leaves_after_a_few_steps() -> dict:
        while llm_engine.stats.decode_tokens < 4:
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def run():
        generation = Generation(slow_engine, metrics, "test", prompts(slow_engine.tokenizer)[:1],
                                [LONG], time.monotonic())
        result = await generation.finish(leaves_after_a_few_steps)
        await until_idle(slow_engine)
        return result, generation

    result, generation = asyncio.run(run())
    assert result is None  # the route answers CLIENT_CLOSED_REQUEST
    assert CLIENT_CLOSED_REQUEST == 499
    assert llm_engine.stats.requests_finished.get("abort", 0) == aborted + 1
    assert ended(metrics, "test", "abort") == 1
    assert generation.finals[0] is None or not generation.finals[0].finished


def test_a_refused_prompt_cancels_those_queued_before_it(slow_engine):
    """The second prompt is empty (refused by add_request): the first, queued already, is
    cancelled long before its 200 steps (2 s here) would end, and nothing is timed."""
    llm_engine = slow_engine.engine
    completed = llm_engine.stats.requests_finished.get("length", 0)
    metrics = ServerMetrics(slow_engine)

    async def run():
        with pytest.raises(ValueError, match="empty"):
            Generation(slow_engine, metrics, "test",
                       [prompts(slow_engine.tokenizer)[0], Prompt(None, [])], [LONG, LONG],
                       time.monotonic())
        await until_idle(slow_engine, timeout=1.0)

    asyncio.run(run())
    assert llm_engine.stats.requests_finished.get("length", 0) == completed
    assert ended(metrics, "test", "abort") == ended(metrics, "test", "length") == 0


def test_every_route_runs_a_generation(server, monkeypatch):
    endpoints = []
    start = Generation.__init__

    def spy(self, engine, metrics, endpoint, *args):
        endpoints.append(endpoint)
        start(self, engine, metrics, endpoint, *args)

    monkeypatch.setattr(Generation, "__init__", spy)
    for method, path, body in [
            ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
            ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True}),
            ("POST", "/v1/chat/completions",
             {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
            ("PUT", "/api", {"prompts": ["Hi"], "tokens_to_generate": 2})]:
        response = httpx.request(method, server.url + path, json=body, timeout=60)
        assert response.status_code == 200, response.text
    assert endpoints == ["completions", "completions", "chat_completions", "megatron"]
