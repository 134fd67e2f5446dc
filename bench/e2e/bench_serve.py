"""Load test of the HTTP server: many concurrent streaming clients on loopback, bounded in count
and time. Reports throughput, time to first token (TTFT) and inter-token latency (ITL)
percentiles, errors (must be 0), and whether the KV cache is empty again afterwards.

    python bench/e2e/bench_serve.py                        # starts fastgen-serve itself
    python bench/e2e/bench_serve.py --url http://127.0.0.1:8000 --model smollm2

Two phases against the same server, in one run:
1. single: one streaming request at a time; its decode rate = (tokens - 1) / (last - first
   token time), the baseline a lone user sees;
2. concurrent: --num-requests requests through --concurrency clients, each streaming; aggregate
   throughput = output tokens / wall time of the phase (prefill included).
The ratio of the two is what continuous batching buys. Requests are /v1/completions with
temperature 0 and ignore_eos, so every request generates exactly --max-tokens tokens.

Afterwards /metrics must show no running or waiting request and a KV cache usage of 0; the
script exits non-zero if any request failed or the cache did not drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

from fastgen import envs

WORDS = ("the a model token cache block server request stream batch prefill decode kernel "
         "attention memory bandwidth latency throughput user answer question river mountain "
         "history science music language city ocean forest").split()


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    tokens: int = 0
    ttft_s: float = 0.0                     # request sent -> first token
    itl_s: list[float] = field(default_factory=list)  # gaps between later tokens
    latency_s: float = 0.0
    decode_s: float = 0.0                   # first token -> last token


@dataclass
class PhaseResult:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    throughput_tok_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    latency_s: dict[str, float]
    decode_tok_s: float  # per request: tokens after the first over the time they took (mean)
    error_messages: list[str]


def make_prompts(count: int, min_words: int, max_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
            for _ in range(count)]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str,
                      max_tokens: int, headers: dict[str, str]) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    times: list[float] = []
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestResult(False, f"HTTP {response.status_code}: {text[:200]}")
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(False, str(chunk["error"]))
                if any(c.get("text") for c in chunk.get("choices", [])):
                    times.append(time.perf_counter())
            if not done:
                return RequestResult(False, "stream ended without [DONE]")
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return RequestResult(False, f"{type(error).__name__}: {error}")
    end = time.perf_counter()
    if not times:
        return RequestResult(False, "no tokens streamed")
    # A chunk may carry several tokens (text held back mid-character); the count comes from the
    # request's max_tokens, the timing from the chunks.
    return RequestResult(True, tokens=max_tokens, ttft_s=times[0] - start,
                         itl_s=[b - a for a, b in zip(times, times[1:])], latency_s=end - start,
                         decode_s=times[-1] - times[0])


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale

    return {"mean": statistics.fmean(ordered) * scale, "p50": pick(0.5), "p90": pick(0.9),
            "p99": pick(0.99), "max": ordered[-1] * scale}


async def run_phase(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                    api_key: str | None = None, timeout_s: float = 600) -> PhaseResult:
    """Sends every prompt, at most `concurrency` in flight, and gathers the results."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await one_request(client, url, model, prompt, max_tokens,
                                                 headers))

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))),
                               timeout_s)
        wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    return PhaseResult(
        concurrency=concurrency, requests=len(results), errors=len(results) - len(ok),
        wall_s=wall, output_tokens=tokens, throughput_tok_s=tokens / wall,
        ttft_ms=percentiles([r.ttft_s for r in ok], 1e3),
        itl_ms=percentiles([g for r in ok for g in r.itl_s], 1e3),
        latency_s=percentiles([r.latency_s for r in ok]),
        decode_tok_s=(sum(r.tokens - 1 for r in ok) / max(sum(r.decode_s for r in ok), 1e-9)
                      if ok else 0.0),
        error_messages=sorted({r.error for r in results if not r.ok})[:5])


def read_metrics(url: str, api_key: str | None = None) -> dict[str, float]:
    """The server's fastgen:* gauges and counters, by name (labels dropped, values summed)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("fastgen:"):
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


LOAD_GAUGES = ("fastgen:kv_cache_usage_perc", "fastgen:num_seqs_running",
               "fastgen:num_requests_waiting")


def cache_drained(url: str, api_key: str | None = None, wait_s: float = 10) -> dict[str, float]:
    """Polls /metrics until nothing runs or waits and the KV cache is empty; returns the last
    reading of the load gauges (the caller checks them)."""
    deadline = time.monotonic() + wait_s
    while True:
        metrics = read_metrics(url, api_key)
        load = {name: metrics[name] for name in LOAD_GAUGES if name in metrics}
        if (len(load) == len(LOAD_GAUGES) and all(v == 0 for v in load.values())) \
                or time.monotonic() > deadline:
            return load
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "fastgen.entrypoints.serve", "--model", args.model,
               "--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", args.served_model_name or args.model,
               "--max-num-seqs", str(max(args.concurrency, 1)), "--log-level", "warning"]
    process = subprocess.Popen(command, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"fastgen-serve exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.terminate()
    raise SystemExit("fastgen-serve did not become healthy in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (default: start fastgen-serve "
                                      "on a free loopback port)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--served-model-name")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--api-key", default=envs.api_key())
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=64,
                        help="requests in the concurrent phase")
    parser.add_argument("--num-single", type=int, default=4,
                        help="requests in the one-at-a-time phase")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900,
                        help="limit on each phase, seconds")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not 1 <= args.concurrency <= 1024 or args.num_requests < 1 or args.num_single < 1:
        parser.error("--concurrency must be in [1, 1024]; request counts at least 1")

    process = None
    url = args.url
    if url is None:
        process, url = start_server(args)
    if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        parser.error("the load test only targets loopback servers")
    model = args.served_model_name or args.model
    try:
        warmup = make_prompts(2, args.min_words, args.max_words, args.seed + 1)
        asyncio.run(run_phase(url, model, warmup, 2, 8, args.api_key, args.timeout))
        single = asyncio.run(run_phase(
            url, model, make_prompts(args.num_single, args.min_words, args.max_words, args.seed),
            1, args.max_tokens, args.api_key, args.timeout))
        concurrent = asyncio.run(run_phase(
            url, model, make_prompts(args.num_requests, args.min_words, args.max_words,
                                     args.seed + 2),
            args.concurrency, args.max_tokens, args.api_key, args.timeout))
        load_after = cache_drained(url, args.api_key)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)

    single_rate = single.decode_tok_s
    ratio = concurrent.throughput_tok_s / single_rate if single_rate else 0.0
    drained = len(load_after) == len(LOAD_GAUGES) and all(v == 0 for v in load_after.values())
    print(f"model {model}  server {url if args.url else 'fastgen-serve (started here)'}")
    print(f"{'phase':<12}{'reqs':>6}{'errors':>8}{'wall s':>9}{'tok/s':>9}"
          f"{'TTFT p50/p90/p99 ms':>24}{'ITL p50/p90/p99 ms':>22}")
    for name, phase in (("single", single), (f"conc. {args.concurrency}", concurrent)):
        t, i = phase.ttft_ms, phase.itl_ms
        print(f"{name:<12}{phase.requests:>6}{phase.errors:>8}{phase.wall_s:>9.1f}"
              f"{phase.throughput_tok_s:>9.1f}"
              f"{t.get('p50', 0):>10.0f}/{t.get('p90', 0):.0f}/{t.get('p99', 0):.0f}"
              f"{i.get('p50', 0):>12.1f}/{i.get('p90', 0):.1f}/{i.get('p99', 0):.1f}")
    print(f"single-request decode rate {single_rate:.1f} tok/s; {args.concurrency} concurrent: "
          f"{concurrent.throughput_tok_s:.1f} tok/s = {ratio:.2f}x")
    print(f"after the load: {load_after} -> KV cache {'empty' if drained else 'NOT EMPTY'}")
    for phase in (single, concurrent):
        for message in phase.error_messages:
            print(f"error: {message}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "max_tokens": args.max_tokens,
                       "single": asdict(single), "concurrent": asdict(concurrent),
                       "single_decode_tok_s": single_rate, "ratio": ratio,
                       "load_after": load_after, "drained": drained}, f, indent=2)
    return 0 if single.errors == concurrent.errors == 0 and drained else 1


if __name__ == "__main__":
    sys.exit(main())
