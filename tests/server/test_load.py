"""The load test of bench/e2e/bench_serve.py at small scale against the real test server: many
concurrent streaming clients, no errors, every request's tokens, and a KV cache that is empty
again afterwards (read from /metrics and from the engine itself)."""

import asyncio
import importlib.util
import sys
from pathlib import Path

from tests.server.conftest import MODEL_NAME

BENCH = Path(__file__).resolve().parents[2] / "bench" / "e2e" / "bench_serve.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_concurrent_streaming_load_drains_the_cache(server):
    bench = load_bench()
    prompts = bench.make_prompts(24, 3, 30, seed=0)
    phase = asyncio.run(bench.run_phase(server.url, MODEL_NAME, prompts, concurrency=12,
                                        max_tokens=12, timeout_s=120))
    assert phase.errors == 0, phase.error_messages
    assert phase.requests == 24 and phase.output_tokens == 24 * 12
    assert phase.ttft_ms["p50"] > 0 and phase.itl_ms["p99"] >= phase.itl_ms["p50"]
    load = bench.cache_drained(server.url)
    assert set(load) == set(bench.LOAD_GAUGES) and all(v == 0 for v in load.values()), load
    engine = server.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()
