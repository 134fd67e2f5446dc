"""Decode-step graphs (CUDA graphs; the CPU's step graphs have their own tests in
test_step_graphs.py).

On CPU, everything but the capture: the bucket sizes, which batches go to the graphs, and greedy
generation through the padded static buffers (DecodeGraphs(capture=False) runs the same forward
eagerly on them) against the plain eager path, with every step's logits compared to an eager
forward of the same batch, batch sizes on and between bucket boundaries, prompts crossing block
boundaries, and sequences finishing at different steps so the batch shrinks across buckets.
On CUDA (marked gpu): the captured graphs against enforce_eager in bf16 and fp32, a served batch
that changes size as requests come and go, and replays that allocate nothing.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig

from fastgen import loader
from fastgen.config import CacheConfig, EngineConfig, SamplingParams
from fastgen.engine.decode_graphs import PAD_SLOT_ID, DecodeGraphs, bucket_for, capture_sizes
from fastgen.engine.engine import LLMEngine
from fastgen.engine.model_input import ModelInput, build_model_input
from fastgen.engine.sequence import Sequence
from fastgen.ops.tolerances import LOGIT_TOLERANCES, assert_close
from fastgen.outputs import CompletionOutput
from tests.engine.tiny_model import save_tiny_llama
from tests.models.harness import save_tiny_model

BLOCK_SIZE = 4  # small, so prompts and decoding cross block boundaries often
MAX_NUM_SEQS = 16  # buckets 1, 2, 4, 8, 16
LOGPROBS = 5


def prompts_for(batch: int) -> list[list[int]]:
    """batch prompts of 1 to 19 tokens (ids of the tiny vocabulary), most of them not a whole
    number of blocks."""
    generator = torch.Generator().manual_seed(batch)
    return [torch.randint(3, 300, (1 + (5 * i + 2) % 19,), generator=generator).tolist()
            for i in range(batch)]


def greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int],
           arrivals: list[int] | None = None) -> list[CompletionOutput]:
    """Greedy completions (with logprobs) of the prompts; prompt i is added before step
    arrivals[i] (default: all before the first)."""
    arrivals = arrivals or [0] * len(prompts)
    ids: dict[int, int] = {}
    outs: dict[int, CompletionOutput] = {}
    step = 0
    while len(outs) < len(prompts):
        for i, (prompt, n, arrival) in enumerate(zip(prompts, max_tokens, arrivals)):
            if arrival == step:
                params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                        logprobs=LOGPROBS)
                ids[engine.add_request(prompt, params)] = i
        for out in engine.step():
            if out.finished:
                outs[ids[out.request_id]] = out.outputs[0]
        step += 1
    return [outs[i] for i in range(len(prompts))]


def assert_same_greedy(actual: list[CompletionOutput], expected: list[CompletionOutput],
                       dtype: torch.dtype) -> None:
    """Token for token with logprobs close (the model's logit tolerance of dtype). Where the two
    picked different tokens, those must have been a near tie in `expected` (a rounding
    difference can only flip those); the rest of that sequence is then not compared."""
    tol = LOGIT_TOLERANCES[dtype]
    for a, e in zip(actual, expected, strict=True):
        assert len(a.token_ids) == len(e.token_ids)
        for token, other, lp, other_lp in zip(a.token_ids, e.token_ids, a.logprobs, e.logprobs):
            if token != other:
                assert token in other_lp and math.isclose(
                    other_lp[token], other_lp[other], rel_tol=tol["rtol"], abs_tol=tol["atol"]), \
                    (a.token_ids, e.token_ids)
                break
            for t in lp.keys() & other_lp.keys():
                assert math.isclose(lp[t], other_lp[t], rel_tol=tol["rtol"], abs_tol=tol["atol"])


# Buckets.

def test_capture_sizes_are_vllms():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144,
                                  160, 176, 192, 208, 224, 240, 256]
    assert capture_sizes(1024) == capture_sizes(256)
    assert capture_sizes(100)[-3:] == [80, 96, 100]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]


def test_bucket_is_the_smallest_size_that_holds_the_batch():
    sizes = capture_sizes(MAX_NUM_SEQS)
    assert [bucket_for(sizes, b) for b in (1, 2, 3, 4, 5, 8, 9, 15, 16)] == \
        [1, 2, 4, 4, 8, 8, 16, 16, 16]
    assert bucket_for(sizes, 17) is None


# Which batches the graphs take.

def scheduled(prompt_len: int, cached: int, num_scheduled: int, generated: int = 0,
              **params) -> tuple[Sequence, int]:
    seq = Sequence(0, list(range(3, 3 + prompt_len)), SamplingParams(**params),
                   params.get("max_tokens", 16))
    seq.token_ids += [7] * generated
    seq.num_cached_tokens = cached
    seq.block_table = [0] * 8
    return seq, num_scheduled


def is_decode_batch(batch: list[tuple[Sequence, int]]) -> bool:
    """Whether the step feeding each (sequence, token count) is one the graphs take."""
    seqs, counts = zip(*batch)
    return build_model_input(list(seqs), list(counts), BLOCK_SIZE).is_decode


def test_only_pure_decode_batches_are_decode_batches():
    decoding = scheduled(5, cached=6, num_scheduled=1, generated=2)
    last_prompt_token = scheduled(5, cached=4, num_scheduled=1)  # samples the first token
    assert is_decode_batch([decoding, last_prompt_token])
    # a prompt chunk
    assert not is_decode_batch([decoding, scheduled(5, cached=0, num_scheduled=5)])
    # a one-token chunk short of the prompt's end (with prompt logprobs: its row is needed)
    assert not is_decode_batch([decoding, scheduled(5, cached=2, num_scheduled=1,
                                                    prompt_logprobs=2)])
    # a scored prompt: nothing to sample
    assert not is_decode_batch([decoding, scheduled(5, cached=4, num_scheduled=1, max_tokens=0)])
    # prompt logprobs asked but all computed: decoding is decoding
    assert is_decode_batch([scheduled(5, cached=6, num_scheduled=1, generated=2,
                                      prompt_logprobs=2)])


# The padded static-buffer path, on CPU.

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> loader.LoadedModel:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-graphs"))
    return loader.load_model(EngineConfig(model=str(path), dtype="float32", device="cpu"))


def cpu_engine(loaded: loader.LoadedModel, **config) -> LLMEngine:
    config = EngineConfig(model=str(loaded.model_dir), dtype="float32", device="cpu",
                          max_num_seqs=MAX_NUM_SEQS, **config,
                          cache=CacheConfig(block_size=BLOCK_SIZE, cpu_kv_cache_gib=0.01))
    return LLMEngine(config, loaded)


def with_static_buffers(engine: LLMEngine, max_num_seqs: int = MAX_NUM_SEQS) -> list[int]:
    """Gives the engine's runner DecodeGraphs without capture, whose every run is checked against
    an eager forward of the same batch (same logits; padding rows as documented). Returns the
    batch sizes it ran, filled in as it runs."""
    runner, model = engine.model_runner, engine.loaded.model
    graphs = DecodeGraphs(model, runner.kv_caches, max_num_seqs, engine.max_model_len,
                          BLOCK_SIZE, capture=False)
    runner.decode_graphs = graphs
    run = graphs.run
    sizes: list[int] = []

    def checked_run(model_input: ModelInput) -> torch.Tensor:
        # The eager forward writes the same keys and values into the same slots first.
        input_ids = torch.tensor(model_input.input_ids)
        positions = torch.tensor(model_input.positions)
        expected = model.compute_logits(model.forward(input_ids, positions,
                                                      runner.forward_batch(model_input)))
        logits = run(model_input)
        assert_close(logits, expected.float(), torch.float32)
        assert_padded(graphs, model_input)
        sizes.append(model_input.num_seqs)
        return logits

    graphs.run = checked_run
    return sizes


def assert_padded(graphs: DecodeGraphs, model_input: ModelInput) -> None:
    tables = model_input.block_tables
    batch, width = len(tables), max(len(t) for t in tables)
    size = bucket_for(graphs.sizes, batch)
    assert graphs.slot_mapping[batch:size].eq(PAD_SLOT_ID).all()
    assert graphs.seq_lens_k[batch:size].eq(1).all()
    assert graphs.input_ids[batch:size].eq(0).all() and graphs.positions[batch:size].eq(0).all()
    assert graphs.block_tables[batch:size, :width].eq(0).all()
    for row, (block_table, seq_len) in enumerate(zip(tables, model_input.seq_lens)):
        table = block_table + [0] * (width - len(block_table))
        assert graphs.block_tables[row, :width].tolist() == table
        assert graphs.seq_lens_k[row] == seq_len


@pytest.mark.parametrize("batch", [1, 3, 8, 9])
def test_static_buffers_match_the_eager_path(tiny, batch):
    prompts = prompts_for(batch)
    max_tokens = [12 - i % 5 for i in range(batch)]  # the batch shrinks over the last steps
    expected = greedy(cpu_engine(tiny), prompts, max_tokens)
    engine = cpu_engine(tiny)
    sizes = with_static_buffers(engine)
    assert_same_greedy(greedy(engine, prompts, max_tokens), expected, torch.float32)
    assert batch in sizes and len(sizes) == max(max_tokens) - 1  # every step after the prefill
    assert [o.token_ids for o in greedy(engine, prompts, max_tokens)] == \
        [o.token_ids for o in expected]  # again, on buffers holding the last run's rows


def test_prefill_chunks_prompt_logprobs_and_large_batches_run_eagerly(tiny):
    # Prompts arrive while others decode and are prefilled in chunks; the graphs hold 4 rows.
    prompts = prompts_for(9)
    max_tokens = [10] * 9
    arrivals = [0, 0, 1, 2, 2, 4, 6, 6, 7]
    expected = greedy(cpu_engine(tiny, max_num_batched_tokens=12), prompts, max_tokens, arrivals)
    engine = cpu_engine(tiny, max_num_batched_tokens=12)
    sizes = with_static_buffers(engine, max_num_seqs=4)
    eager = eager_batches(engine)
    assert_same_greedy(greedy(engine, prompts, max_tokens, arrivals), expected, torch.float32)
    assert sizes and max(sizes) <= 4
    assert any(not decode for _, decode in eager)  # prompt chunks
    assert any(n > 4 and decode for n, decode in eager)  # decode batches above the largest bucket

    # Prompt logprobs: an 11-token prompt in chunks of 4, 4 and 3, then two decode steps.
    prompt = list(range(40, 51))
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2)
    want = list(cpu_engine(tiny, max_num_batched_tokens=4).stream(prompt, params))[-1]
    engine = cpu_engine(tiny, max_num_batched_tokens=4)
    sizes = with_static_buffers(engine)
    eager = eager_batches(engine)
    got = list(engine.stream(prompt, params))[-1]
    assert sizes == [1, 1] and [n for n, _ in eager] == [1, 1, 1]
    assert got.token_ids == want.token_ids and got.prompt_logprobs == want.prompt_logprobs


def eager_batches(engine: LLMEngine) -> list[tuple[int, bool]]:
    """Records (batch size, whether a decode batch) of every step the runner runs eagerly."""
    runner = engine.model_runner
    run, batches = runner._run_eager, []

    def recorded(model_input: ModelInput, masks):
        batches.append((model_input.num_seqs, model_input.is_decode))
        return run(model_input, masks)

    runner._run_eager = recorded
    return batches


# Captured graphs, on CUDA.

GPU_MODEL = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                        max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-graphs-gpu")
    save_tiny_model(GPU_MODEL, folder)  # head size 64: one the CUDA attention kernels take
    return folder


def cuda_engines(folder, dtype: str, max_num_seqs: int = 32) -> tuple[LLMEngine, LLMEngine]:
    """(with graphs, with enforce_eager) engines sharing one loaded model."""
    configs = [EngineConfig(model=str(folder), dtype=dtype, device="cuda",
                            max_num_seqs=max_num_seqs, enforce_eager=eager)
               for eager in (False, True)]
    loaded = loader.load_model(configs[0])
    return LLMEngine(configs[0], loaded), LLMEngine(configs[1], loaded)


def count_replays(engine: LLMEngine) -> list[int]:
    """Records the batch size of every decode step the engine's graphs run."""
    graphs = engine.model_runner.decode_graphs
    run, sizes = graphs.run, []

    def counted(seqs: list[Sequence]) -> torch.Tensor:
        sizes.append(len(seqs))
        return run(seqs)

    graphs.run = counted
    return sizes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_match_enforce_eager(gpu_model_dir, dtype, batch, caplog):
    caplog.set_level("INFO", logger="fastgen.engine.decode_graphs")
    graphs, eager = cuda_engines(gpu_model_dir, str(dtype).removeprefix("torch."))
    assert eager.model_runner.decode_graphs is None
    assert graphs.model_runner.decode_graphs.sizes == [1, 2, 4, 8, 16, 24, 32]
    assert "captured CUDA graphs of the decode step for 7 batch sizes" in caplog.text
    replays = count_replays(graphs)
    prompts = prompts_for(batch)
    max_tokens = [20 - i % 7 for i in range(batch)]
    assert_same_greedy(greedy(graphs, prompts, max_tokens), greedy(eager, prompts, max_tokens),
                       dtype)
    assert batch in replays and len(replays) == max(max_tokens) - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_serving_as_requests_come_and_go(gpu_model_dir):
    graphs, eager = cuda_engines(gpu_model_dir, "float32", max_num_seqs=16)
    replays = count_replays(graphs)
    prompts = prompts_for(24)
    max_tokens = [4 + (7 * i) % 17 for i in range(24)]
    arrivals = [0, 0, 0, 1, 3, 3, 3, 3, 5, 8, 8, 9, 12, 12, 12, 12, 12, 15, 20, 21, 21, 30, 31, 40]
    assert_same_greedy(greedy(graphs, prompts, max_tokens, arrivals),
                       greedy(eager, prompts, max_tokens, arrivals), torch.float32)
    assert len(set(replays)) >= 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replay_allocates_nothing(gpu_model_dir):
    engine, _ = cuda_engines(gpu_model_dir, "bfloat16")
    replays = count_replays(engine)
    for prompt in prompts_for(5):
        engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0.8, top_k=20,
                                                  ignore_eos=True))
    for _ in range(3):  # the prefill, then decode steps
        engine.step()
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    for _ in range(10):
        engine.step()
        assert torch.cuda.memory_allocated() == allocated
        assert torch.cuda.memory_reserved() == reserved
    assert replays[-10:] == [5] * 10
