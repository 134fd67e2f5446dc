"""Prometheus metrics of one server, named like vLLM's (`vllm:...` there, `fastgen:...` here),
served as text at GET /metrics.

Two sources, so that each number has one owner:
- the engine's own state and counters (queue, running batch, KV-cache usage, tokens, prefix
  cache, preemptions) are read at scrape time by a collector, never copied;
- per-request latencies (time to first token, inter-token latency, end to end) and the request
  counter by endpoint and finish reason are observed by the server as outputs reach it, since
  only the server knows when a request arrived and what a client saw.

Each app gets its own CollectorRegistry (no process-wide state), so several servers, or tests,
can run in one process.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fastgen.engine.async_engine import AsyncLLMEngine
from fastgen.outputs import RequestOutput

# Seconds; vLLM's buckets, with finer low ends for fast CPU models.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's build_1_2_5_buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_model_len:
                return buckets
            buckets.append(value)
        scale *= 10


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST  # of render()'s text

    def __init__(self, engine: AsyncLLMEngine):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "fastgen:requests", "Engine requests (one per prompt) ended, by endpoint and by "
            "finish reason (stop, length, abort: the client went away or the request failed)",
            ["endpoint", "finished_reason"], registry=registry)
        self.time_to_first_token = Histogram(
            "fastgen:time_to_first_token_seconds", "From the request's arrival to its first "
            "generated token", buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "fastgen:inter_token_latency_seconds", "Between a request's successive outputs "
            "(one per engine step, each with one new token per sample)", buckets=ITL_BUCKETS,
            registry=registry)
        self.e2e_latency = Histogram(
            "fastgen:e2e_request_latency_seconds", "From the request's arrival to its end",
            buckets=E2E_BUCKETS, registry=registry)
        buckets = token_buckets(engine.engine.max_model_len)
        self.request_prompt_tokens = Histogram(
            "fastgen:request_prompt_tokens", "Prompt tokens per engine request",
            buckets=buckets, registry=registry)
        self.request_generation_tokens = Histogram(
            "fastgen:request_generation_tokens", "Generated tokens per engine request (all "
            "samples)", buckets=buckets, registry=registry)
        registry.register(_EngineCollector(engine))

    def request(self, endpoint: str, arrival: float, num_prompt_tokens: int) -> RequestMetrics:
        """A tracker for one engine request; arrival is a time.monotonic() value."""
        return RequestMetrics(self, endpoint, arrival, num_prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """One engine request's timings, observed as its outputs reach the server."""

    def __init__(self, metrics: ServerMetrics, endpoint: str, arrival: float,
                 num_prompt_tokens: int):
        self._metrics = metrics
        self._endpoint = endpoint
        self._arrival = arrival
        self._num_prompt_tokens = num_prompt_tokens
        self._num_tokens = 0          # generated so far, all samples
        self._last: float | None = None  # when the last new tokens arrived
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        """Takes the request's next DELTA output (see fastgen.outputs.RequestOutputKind)."""
        now = time.monotonic()
        num_new = sum(len(sample.token_ids) for sample in out.outputs)
        if num_new:
            if self._last is None:
                self._metrics.time_to_first_token.observe(now - self._arrival)
            else:
                self._metrics.inter_token_latency.observe(now - self._last)
            self._last = now
            self._num_tokens += num_new
        if out.finished:
            self._end(out.finish_reason.value, now)

    def abort(self) -> None:
        """The request was cancelled before it finished; a no-op once it has ended."""
        if not self.done:
            self._end("abort", time.monotonic())

    def _end(self, reason: str, now: float) -> None:
        self.done = True
        metrics = self._metrics
        metrics.requests.labels(self._endpoint, reason).inc()
        metrics.e2e_latency.observe(now - self._arrival)
        metrics.request_prompt_tokens.observe(self._num_prompt_tokens)
        metrics.request_generation_tokens.observe(self._num_tokens)


class _EngineCollector:
    """The engine's load and counters, read when Prometheus scrapes. Plain reads of ints and
    lengths that the engine thread updates; a scrape may see a step half-counted, never a torn
    value."""

    def __init__(self, engine: AsyncLLMEngine):
        self._engine = engine

    def collect(self):
        engine, llm_engine = self._engine, self._engine.engine
        stats = llm_engine.stats
        yield _gauge("fastgen:num_requests_waiting", "Requests (samples, once in the "
                     "scheduler) waiting to be admitted", engine.num_waiting)
        yield _gauge("fastgen:num_seqs_running", "Sequences (samples) in the running batch",
                     llm_engine.num_running)
        yield _gauge("fastgen:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)",
                     llm_engine.kv_cache_usage)
        yield _gauge("fastgen:kv_cache_bytes_per_token", "KV-cache bytes one token takes, "
                     "over every layer", llm_engine.kv_cache_bytes_per_token)
        yield _gauge("fastgen:kv_cache_capacity_tokens", "Tokens the KV cache holds, over all "
                     "sequences", llm_engine.kv_cache_capacity_tokens)
        yield _gauge("fastgen:prefix_cache_hit_rate", "Of the prompt tokens of admitted "
                     "sequences, the fraction found in the prefix cache (since start)",
                     stats.prefix_cache_hit_rate)
        yield _counter("fastgen:prompt_tokens", "Prompt tokens of the requests added",
                       stats.prompt_tokens)
        yield _counter("fastgen:generation_tokens", "Tokens generated", stats.generation_tokens)
        yield _counter("fastgen:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                       "cache", stats.prefix_cache_queried_tokens)
        yield _counter("fastgen:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                       stats.prefix_cache_hit_tokens)
        yield _counter("fastgen:num_preemptions", "Sequences preempted for want of KV-cache "
                       "blocks (recomputed later)", llm_engine.scheduler.num_preemptions)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
