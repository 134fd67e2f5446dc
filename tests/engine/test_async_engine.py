"""AsyncLLMEngine: requests added from asyncio while the engine thread steps give the same tokens
as LLM.generate; a stream abandoned midway frees its blocks; a full queue and an impossible
request are refused at once."""

import asyncio
import time

import pytest

from fastgen import LLM, SamplingParams
from fastgen.engine.async_engine import AsyncLLMEngine, QueueFullError
from tests.engine.test_continuous_batching import make_llm, prompts
from tests.engine.tiny_model import save_tiny_llama

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    return make_llm(save_tiny_llama(tmp_path_factory.mktemp("tiny-async")),
                    max_num_batched_tokens=32)


def test_concurrent_streams_match_offline_generate(llm):
    batch = prompts(6, seed=7)
    expected = [o.token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    engine = AsyncLLMEngine(llm.engine)
    engine.start()

    async def one(prompt, delay):
        await asyncio.sleep(delay)  # arrive while others are running
        deltas, last = [], None
        async for out in engine.generate(prompt, GREEDY):
            deltas.append(out.delta)
            last = out
        assert "".join(deltas) == last.text
        return last.token_ids

    async def main():
        return await asyncio.gather(*(one(p, 0.01 * i) for i, p in enumerate(batch)))

    try:
        assert asyncio.run(main()) == expected
    finally:
        engine.stop()


def test_an_abandoned_stream_frees_its_blocks(llm):
    engine = AsyncLLMEngine(llm.engine)
    engine.start()
    bm = llm.engine.block_manager

    async def main():
        stream = engine.add_request(prompts(1, seed=8)[0], SamplingParams(max_tokens=200,
                                                                           ignore_eos=True))
        async for _ in stream:
            assert bm.num_free_blocks < bm.num_blocks
            break  # the client went away
        stream.abort()
        for _ in range(200):
            if bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished():
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        assert asyncio.run(main())
        assert llm.engine.stats.requests_finished.get("abort", 0) >= 1
    finally:
        engine.stop()


def test_refusals_are_immediate(llm):
    engine = AsyncLLMEngine(llm.engine, max_waiting_requests=2)  # not started: nothing drains

    async def main():
        with pytest.raises(ValueError, match="context"):
            engine.add_request([5] * (llm.max_model_len + 1), GREEDY)
        with pytest.raises(ValueError, match="empty"):
            engine.add_request([], GREEDY)
        streams = [engine.add_request([5, 6], GREEDY) for _ in range(2)]
        with pytest.raises(QueueFullError):
            engine.add_request([5, 6], GREEDY)
        for stream in streams:
            stream.abort()

    asyncio.run(main())
    engine.start()  # the queued adds and their aborts cancel out
    time.sleep(0.05)
    engine.stop()
    assert not llm.engine.has_unfinished()
