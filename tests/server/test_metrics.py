"""GET /metrics against a real server: Prometheus text whose counters follow the requests served
(by endpoint and finish reason, tokens equal to the answers' usage), latency histograms that
count each request, engine gauges that show a request in flight and return to idle, the prefix
cache's hits, and a registry per app."""

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastgen.server.metrics import token_buckets
from tests.server.conftest import MODEL_NAME


def scrape(server) -> dict[str, float]:
    """Every sample as {name{label=value,...}: value}."""
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def post(server, path: str, **body) -> dict:
    response = httpx.post(f"{server.url}{path}", json={"model": MODEL_NAME, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_counters_and_histograms_follow_the_requests(server):
    before = scrape(server)
    one = post(server, "/v1/completions", prompt=["Hello", "Once upon"], max_tokens=5,
               ignore_eos=True)
    two = post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}],
               max_tokens=4, n=2, ignore_eos=True)
    stop = post(server, "/v1/completions", prompt="Hi", max_tokens=20,
                stop_token_ids=list(range(400)))  # the first token stops it
    streamed = httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"prompt": "Hi", "max_tokens": 3, "stream": True})
    assert streamed.text.endswith("data: [DONE]\n\n")
    megatron = httpx.put(f"{server.url}/api", timeout=60,
                         json={"prompts": ["Hi", "Hello"], "tokens_to_generate": 2, "top_k": 1})
    assert megatron.status_code == 200, megatron.text
    megatron_prompt = sum(len(server.tokenizer.encode(p, add_special_tokens=False))
                          for p in ("Hi", "Hello"))
    after = scrape(server)

    requests = "fastgen:requests_total{endpoint=%s,finished_reason=%s}"
    assert delta(before, after, requests % ("completions", "length")) == 3  # 2 prompts + stream
    assert delta(before, after, requests % ("completions", "stop")) == 1
    assert delta(before, after, requests % ("chat_completions", "length")) == 1
    megatron_ended = sum(delta(before, after, requests % ("megatron", reason))
                         for reason in ("length", "stop"))
    assert megatron_ended == 2
    usages = [one["usage"], two["usage"], stop["usage"]]
    streamed_prompt = len(server.tokenizer.encode("Hi"))
    megatron_generated = sum(len(t) for t in megatron.json()["tokens"]) - megatron_prompt
    assert delta(before, after, "fastgen:prompt_tokens_total") == \
        sum(u["prompt_tokens"] for u in usages) + streamed_prompt + megatron_prompt
    assert delta(before, after, "fastgen:generation_tokens_total") == \
        sum(u["completion_tokens"] for u in usages) + 3 + megatron_generated
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "request_prompt_tokens", "request_generation_tokens"):
        assert delta(before, after, f"fastgen:{histogram}_count") == 7  # engine requests
    # Outputs after the first: 4 + 4 (two prompts), 3 (two samples per step), 2 (streamed),
    # 1 + 1 (Megatron's two prompts).
    assert delta(before, after, "fastgen:inter_token_latency_seconds_count") == 15
    assert 0 < delta(before, after, "fastgen:e2e_request_latency_seconds_sum") < 60
    assert delta(before, after, "fastgen:request_generation_tokens_sum") == \
        sum(u["completion_tokens"] for u in usages) + 3 + megatron_generated


def test_gauges_show_a_request_in_flight_then_idle(start_server):
    slow = start_server(step_delay=0.01)
    with httpx.stream("POST", f"{slow.url}/v1/completions", timeout=30, json={
            "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True,
            "stream": True}) as response:
        lines = response.iter_lines()  # kept open: the request stays in flight
        next(lines)
        busy = scrape(slow)
    assert busy["fastgen:num_seqs_running"] == 1
    assert busy["fastgen:num_requests_waiting"] == 0
    assert 0 < busy["fastgen:kv_cache_usage_perc"] < 1
    deadline = time.monotonic() + 10
    while (idle := scrape(slow))["fastgen:kv_cache_usage_perc"] > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert idle["fastgen:num_seqs_running"] == 0
    assert idle["fastgen:requests_total{endpoint=completions,finished_reason=abort}"] == 1
    engine = slow.engine.engine
    assert idle["fastgen:kv_cache_bytes_per_token"] == engine.kv_cache_bytes_per_token > 0
    assert idle["fastgen:kv_cache_capacity_tokens"] == engine.kv_cache_capacity_tokens > 0


def test_prefix_cache_hits_are_counted(server):
    prompt = "The capital of France is Paris. The capital of Germany is Berlin. " * 3
    before = scrape(server)
    for _ in range(2):
        post(server, "/v1/completions", prompt=prompt, max_tokens=1)
    after = scrape(server)
    queried = delta(before, after, "fastgen:prefix_cache_queries_total")
    hits = delta(before, after, "fastgen:prefix_cache_hits_total")
    assert queried > 0 and hits >= 16  # the second request found at least a block
    assert 0 < after["fastgen:prefix_cache_hit_rate"] <= 1
    assert "fastgen:num_preemptions_total" in after


def test_each_app_has_its_own_registry(server, start_server):
    name = "fastgen:requests_total{endpoint=completions,finished_reason=length}"
    served = scrape(server).get(name, 0)
    other = start_server()
    assert name not in scrape(other)
    post(other, "/v1/completions", prompt="Hi", max_tokens=1)
    assert scrape(other)[name] == 1
    assert scrape(server).get(name, 0) == served


@pytest.mark.parametrize("length, expected", [(1, [1]), (9, [1, 2, 5]),
                                              (256, [1, 2, 5, 10, 20, 50, 100, 200])])
def test_token_buckets(length, expected):
    assert token_buckets(length) == expected
