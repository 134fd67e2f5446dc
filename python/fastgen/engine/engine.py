"""The engine: requests in, tokens and text out, one batched forward pass per `step()`.

    engine = LLMEngine(EngineConfig())
    rid = engine.add_request(token_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.delta, out.finished)

A step asks the scheduler for a batch (a prefill of newly admitted requests, or one decode token
for each running one), has the model runner run it, then appends each sampled token, detokenizes
it and checks the request's stop conditions; the blocks the step filled join the prefix cache.
Everything a later server needs (continuous batching across requests arriving at any time,
streaming, aborts) goes through these same calls.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from fastgen import loader
from fastgen.config import EngineConfig, SamplingParams
from fastgen.engine.block_manager import BlockManager
from fastgen.engine.detokenizer import IncrementalDetokenizer
from fastgen.engine.model_runner import ModelRunner
from fastgen.engine.scheduler import Scheduler, StepKind
from fastgen.engine.sequence import FinishReason, Sequence


@dataclass
class RequestOutput:
    """A request's state after a step: everything generated so far, and what is new."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str                         # output text so far (final once finished)
    token_ids: list[int]              # output token ids so far, EOS / stop token included
    finish_reason: FinishReason | None
    delta: str = ""                   # text safe to stream since this request's last output
    # With SamplingParams.logprobs = n: one {token_id: logprob} per output token, the n most
    # likely first (descending), then the sampled token if not among them; else None.
    logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """Counters since the engine started, for tests and metrics. A recomputed (preempted)
    sequence counts again."""

    prefill_tokens: int = 0                # tokens fed to the model by prefill steps
    decode_tokens: int = 0                 # tokens fed by decode steps (one per sequence)
    prefix_cache_queried_tokens: int = 0   # tokens of the sequences admitted to prefill
    prefix_cache_hit_tokens: int = 0       # of those, found in the prefix cache (not fed)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hit_tokens / max(self.prefix_cache_queried_tokens, 1)


@dataclass
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    prompt: str | None
    prompt_token_ids: list[int]  # kept apart so an output per step does not copy the prompt

    def output(self) -> RequestOutput:
        seq = self.seq
        return RequestOutput(seq.seq_id, self.prompt, self.prompt_token_ids, self.detokenizer.text,
                             seq.output_token_ids, self.detokenizer.finish_reason,
                             self.detokenizer.pop_delta(),
                             None if seq.output_logprobs is None else list(seq.output_logprobs))


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: loader.LoadedModel | None = None):
        """Loads config.model (or takes an already loaded model) and sizes the KV cache."""
        self.config = config
        self.loaded = loaded if loaded is not None else loader.load_model(config)
        self.tokenizer = self.loaded.tokenizer
        self.eos_token_ids = list(self.loaded.eos_token_ids)
        self.max_model_len = self.loaded.max_model_len
        block_size = config.cache.block_size
        blocks_per_seq = (self.max_model_len + block_size - 1) // block_size
        self.model_runner = ModelRunner(self.loaded.model, config,
                                        max_blocks_needed=config.max_num_seqs * blocks_per_seq)
        self.block_manager = BlockManager(self.model_runner.num_blocks, block_size,
                                          config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len)
        self.stats = EngineStats()
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    prompt: str | None = None) -> int:
        """Queues a request and returns its id. ValueError when the prompt can never run.
        max_tokens is capped to the room the context leaves after the prompt."""
        params = params if params is not None else SamplingParams()
        prompt_token_ids = list(prompt_token_ids)
        room = self.max_model_len - len(prompt_token_ids)
        generator = (self.model_runner.sampler.make_generator(params.seed)
                     if params.seed is not None else None)
        request_id = next(self._ids)
        seq = Sequence(request_id, prompt_token_ids, params, max(min(params.max_tokens, room), 1),
                       generator)
        self.scheduler.add(seq)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params,
                                             self.eos_token_ids, seq.max_tokens)
        self._requests[request_id] = _Request(seq, detokenizer, prompt, prompt_token_ids)
        return request_id

    def abort_request(self, request_id: int) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request.seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns an output for every request that got a token."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        new_tokens = [len(seq) - seq.num_cached_tokens for seq in batch.seqs]
        stats = self.stats
        if batch.kind is StepKind.PREFILL:
            stats.prefill_tokens += batch.num_tokens
            for seq in batch.seqs:
                stats.prefix_cache_queried_tokens += len(seq)
                stats.prefix_cache_hit_tokens += seq.num_cached_tokens
        else:
            stats.decode_tokens += batch.num_tokens
        tokens, logprobs = self.model_runner.run(batch)
        outputs = []
        for seq, token, token_logprobs, written in zip(batch.seqs, tokens, logprobs, new_tokens):
            # While the sequence still holds its blocks: finishing below frees them.
            self.block_manager.cache_full_blocks(seq, written)
            seq.append_token(token, token_logprobs)
            request = self._requests[seq.seq_id]
            reason = request.detokenizer.append(token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self._requests[seq.seq_id]
            outputs.append(request.output())
        return outputs

    def stream(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
               prompt: str | None = None) -> Iterator[RequestOutput]:
        """Adds one request and steps the engine until it finishes, yielding its outputs (read
        `.delta` for the new text). Other requests in the engine advance too, but their outputs
        from these steps are not returned: serve several at once with `step()` instead."""
        request_id = self.add_request(prompt_token_ids, params, prompt)
        try:
            while True:
                for out in self.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort_request(request_id)  # the caller stopped early: free its blocks
