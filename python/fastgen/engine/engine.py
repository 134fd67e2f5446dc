"""The engine: requests in, tokens and text out, one batched forward pass per `step()`.

    engine = LLMEngine(EngineConfig())
    rid = engine.add_request(token_ids, SamplingParams(max_tokens=32),
                             output_kind=RequestOutputKind.DELTA)
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.outputs[0].delta, out.finished)

A request is one Sequence per sample (SamplingParams.n); the samples share the prompt's blocks
through the prefix cache. A step asks the scheduler for a batch (decode tokens and prompt chunks
of any running or newly admitted sequences), flattens it into a ModelInput, has the model runner
run it (it returns a ModelOutput and touches no engine state), lets the scheduler apply the output
(tokens appended, stop tokens and max_tokens checked), then detokenizes the new tokens, checks
stop strings and finishes the samples that stop. A sample with structured outputs holds its
grammar's matcher: the step starts filling the masks of the constrained rows on a worker thread
as soon as its input is built (the sampler waits for them after the forward pass), and each
sampled token advances the matcher, which ends the sample once its output is complete
(engine/structured_output.py). Both front ends drive this
same object: LLM.generate by calling step() until done, the server through AsyncLLMEngine, which
calls it from one thread while requests arrive and leave at any time.

A request's outputs are built only as its RequestOutputKind asks (fastgen.outputs): at every step
with everything so far (CUMULATIVE, the default), with what is new (DELTA), or once at the end
(FINAL_ONLY); so a step's host work beyond the forward pass is the sampled tokens'
detokenization and stop checks, and outputs only for those who read them.

At the end of __init__ the objects that loading created (a few hundred thousand: torch,
transformers, the model) are frozen out of the garbage collector's reach, as vLLM does: a full
collection would otherwise walk them all, a pause of ~0.25 s in the middle of some later step.
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastgen import loader
from fastgen.config import EngineConfig, SamplingParams
from fastgen.distributed import SINGLE_RANK
from fastgen.engine import parallel
from fastgen.engine.block_manager import BlockManager
from fastgen.engine.detokenizer import IncrementalDetokenizer, text_decoder
from fastgen.engine.model_input import NewlineAfterColon, build_model_input
from fastgen.engine.model_runner import ModelRunner
from fastgen.engine.scheduler import Scheduler
from fastgen.engine.sequence import Sequence
from fastgen.engine.structured_output import GrammarCompiler, MaskFiller, TokenMasks, advance
from fastgen.outputs import CompletionOutput, FinishReason, RequestOutput, RequestOutputKind

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters since the engine started, for tests and metrics. A recomputed (preempted)
    sequence's tokens count again in the fed-token counters."""

    prefill_tokens: int = 0                # prompt (and recomputed) tokens fed to the model
    decode_tokens: int = 0                 # tokens fed by decoding (one per sequence and step)
    prefix_cache_queried_tokens: int = 0   # tokens of the sequences admitted
    prefix_cache_hit_tokens: int = 0       # of those, found in the prefix cache (not fed)
    prompt_tokens: int = 0                 # prompt tokens of the requests added
    generation_tokens: int = 0             # tokens sampled
    requests_added: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    steps: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hit_tokens / max(self.prefix_cache_queried_tokens, 1)


@dataclass
class _Sample:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    num_sent_tokens: int = 0  # output tokens already handed out in DELTA outputs

    def output(self) -> CompletionOutput:
        """Everything so far (CUMULATIVE, FINAL_ONLY)."""
        seq, detok = self.seq, self.detokenizer
        return CompletionOutput(seq.index, detok.text, seq.output_token_ids, seq.finish_reason,
                                None if seq.output_logprobs is None else list(seq.output_logprobs),
                                detok.pop_delta())

    def delta_output(self) -> CompletionOutput:
        """What is new since the previous output (DELTA)."""
        seq, detok = self.seq, self.detokenizer
        start = self.num_sent_tokens
        token_ids = seq.token_ids[seq.num_prompt_tokens + start:]
        self.num_sent_tokens += len(token_ids)
        logprobs = None if seq.output_logprobs is None else seq.output_logprobs[start:]
        delta = detok.pop_delta()
        return CompletionOutput(seq.index, delta, token_ids, seq.finish_reason, logprobs, delta)


@dataclass
class _Request:
    request_id: int
    samples: list[_Sample]
    prompt: str | None
    prompt_token_ids: list[int]  # kept apart so an output per step does not copy the prompt
    output_kind: RequestOutputKind
    num_unfinished: int = 0  # samples without a finish reason
    # [None, *the first sample's prompt logprobs], made once they are all in (outputs share it).
    prompt_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0

    def output(self) -> RequestOutput:
        first = self.samples[0].seq
        if self.prompt_logprobs is None and first.prompt_logprobs is not None and \
                len(first.prompt_logprobs) == first.num_prompt_tokens - 1:
            self.prompt_logprobs = [None, *first.prompt_logprobs]
        if self.output_kind is RequestOutputKind.DELTA:
            samples = [s.delta_output() for s in self.samples]
        else:
            samples = [s.output() for s in self.samples]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, samples,
                             self.prompt_logprobs)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: loader.LoadedModel | None = None):
        """Loads config.model (or takes an already loaded model) and sizes the KV cache."""
        self.config = config
        # Tensor parallelism: this process is rank 0 of the group, which gets every step's input
        # before its own shard runs it (fastgen.engine.parallel).
        self.driver: parallel.Driver | None = None
        tp = SINGLE_RANK
        if config.parallel.tensor_parallel_size > 1:
            if loaded is not None:
                raise ValueError("a loaded model cannot be sharded over tensor-parallel ranks")
            tp, workers = parallel.start_group(config)
            self.driver = parallel.Driver(tp, workers)
        try:
            self.loaded = loaded if loaded is not None else loader.load_model(config, tp)
        except BaseException:
            if self.driver is not None:
                self.driver.close()
            raise
        self.tokenizer = self.loaded.tokenizer
        self._decode = text_decoder(self.tokenizer)  # shared by every request's detokenizer
        self.eos_token_ids = list(self.loaded.eos_token_ids)
        self.max_model_len = self.loaded.max_model_len
        self.block_size = block_size = config.cache.block_size
        self.model_runner = ModelRunner(self.loaded.model, config, self.max_model_len, tp)
        self.block_manager = BlockManager(self.model_runner.num_blocks, block_size,
                                          config.cache.enable_prefix_caching)
        runner = self.model_runner
        logger.info("KV cache: %d blocks of %d tokens = %d tokens, %d bytes per token (%.2f GiB)",
                    runner.num_blocks, block_size, self.kv_cache_capacity_tokens,
                    runner.bytes_per_token,
                    self.kv_cache_capacity_tokens * runner.bytes_per_token / 2**30)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len)
        self.vocab_size = self.loaded.hf_config.vocab_size  # the logits' width
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._masks = MaskFiller(self.vocab_size)
        self._newline_after_colon: NewlineAfterColon | None = None  # on first use
        self.stats = EngineStats()
        self._requests: dict[int, _Request] = {}
        self._sample_of: dict[int, tuple[_Request, _Sample]] = {}  # by seq_id
        self._request_ids = itertools.count()
        self._seq_ids = itertools.count()
        self._gone_seq_ids: list[int] = []  # finished or aborted since the last step
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        """Stops the tensor-parallel workers (also done at exit); the engine cannot step after."""
        self._masks.close()
        if self.driver is not None:
            self.driver.close()

    # Load, for metrics and admission control.

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    @property
    def kv_cache_bytes_per_token(self) -> int:
        """What one cached token costs over every layer (MLA's latent rows: a fraction of K + V)."""
        return self.model_runner.bytes_per_token

    @property
    def kv_cache_capacity_tokens(self) -> int:
        """Tokens the KV cache holds, over all sequences."""
        return self.model_runner.num_blocks * self.block_size

    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """ValueError when such a request could never run (what add_request would refuse): too
        long, a logit_bias token outside the vocabulary, an invalid structured output (compiled
        here, and cached for add_request)."""
        self.scheduler.check(num_prompt_tokens, params.max_tokens)
        bad = next((t for t in params.logit_bias or () if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token id {bad} is outside the vocabulary (0 to "
                             f"{self.vocab_size - 1})")
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    prompt: str | None = None,
                    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> int:
        """Queues a request and returns its id. ValueError when the prompt can never run.
        max_tokens is capped to the room the context leaves after the prompt. output_kind: which
        outputs step() returns for it (see fastgen.outputs)."""
        params = params if params is not None else SamplingParams()
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise ValueError("a prompt needs at least one token")
        self.check_request(len(prompt_token_ids), params)
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = min(params.max_tokens, room)
        grammar = (None if params.structured_outputs is None
                   else self.grammars.compile(params.structured_outputs))
        if params.prevent_newline_after_colon and self._newline_after_colon is None:
            self._newline_after_colon = NewlineAfterColon.of(self.tokenizer, self.vocab_size)
        request = _Request(next(self._request_ids), [], prompt, prompt_token_ids, output_kind,
                           num_unfinished=params.n)
        eos = tuple(self.eos_token_ids)
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), prompt_token_ids, params, max_tokens, index, eos)
            if grammar is not None:
                seq.grammar = grammar.matcher()
            detokenizer = IncrementalDetokenizer(self.tokenizer, len(prompt_token_ids),
                                                 params.stop, self._decode)
            sample = _Sample(seq, detokenizer)
            request.samples.append(sample)
            self._sample_of[seq.seq_id] = (request, sample)
        for sample in request.samples:
            self.scheduler.add(sample.seq)
        self._requests[request.request_id] = request
        self.stats.requests_added += 1
        self.stats.prompt_tokens += len(prompt_token_ids)
        return request.request_id

    def abort_request(self, request_id: int) -> None:
        """Cancels a request: its samples leave the queue or the batch, and their blocks are
        freed at once. A no-op for an unknown or finished request."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        for sample in request.samples:
            seq = sample.seq
            if not seq.is_finished:
                request.num_unfinished -= 1
            self.scheduler.abort(seq)
            if not sample.detokenizer.finished:
                sample.detokenizer.finish(seq.token_ids)
            self._gone_seq_ids.append(seq.seq_id)
            del self._sample_of[seq.seq_id]
        self._count_finished(FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns an output for every request that advanced, but those added
        FINAL_ONLY, whose one output comes with the step that finishes them."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        stats = self.stats
        stats.steps += 1
        prefill = batch.num_prefill_tokens
        stats.prefill_tokens += prefill
        stats.decode_tokens += batch.num_tokens - prefill
        for seq in batch.admitted:
            stats.prefix_cache_queried_tokens += len(seq)
            stats.prefix_cache_hit_tokens += seq.num_cached_tokens
        model_input = build_model_input(batch.seqs, batch.num_scheduled, self.block_size,
                                        self._gone_seq_ids, self._newline_after_colon)
        self._gone_seq_ids = []
        masks = self._start_masks(batch.seqs, model_input.sampling.rows)
        if self.driver is None:
            output = self.model_runner.execute(model_input, masks)
        else:
            try:
                self.driver.send(model_input)
                output = self.model_runner.execute(model_input, masks)
            except Exception as e:  # noqa: BLE001  (whatever failed, the ranks are out of step)
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise parallel.WorkerLostError(f"tensor-parallel step failed: {reason}") from e
        stats.generation_tokens += len(output.sampled_token_ids)
        outputs = []
        for request in self._advance(self.scheduler.update_from_output(batch, model_input,
                                                                       output)):
            outputs.append(request.output())
            if request.finished:
                del self._requests[request.request_id]
                self._count_finished(request.samples[0].seq.finish_reason)
        return outputs

    def _start_masks(self, seqs: list[Sequence], rows: list[int]) -> TokenMasks | None:
        """Starts filling the masks of the step's constrained sampling rows (None when it has
        none). rows: the batch index of each sampling row."""
        constrained = [(r, seqs[b].grammar) for r, b in enumerate(rows)
                       if seqs[b].grammar is not None]
        if not constrained:
            return None
        return self._masks.start([r for r, _ in constrained], [m for _, m in constrained])

    def _advance(self, updates: list[tuple[Sequence, FinishReason | None]]) -> list[_Request]:
        """Advances each constrained sequence's grammar by its new token, detokenizes the token
        (the scheduler has appended it and checked stop tokens and max_tokens), checks stop
        strings, and finishes the samples that stop. Returns the requests that advanced and want
        an output now (not those added FINAL_ONLY, until they finish), each once, in batch
        order."""
        final_only = RequestOutputKind.FINAL_ONLY
        sample_of = self._sample_of
        reporting: dict[int, _Request] = {}
        finished: list[tuple[Sequence, FinishReason]] = []
        for seq, reason in updates:
            request, sample = sample_of[seq.seq_id]
            detokenizer = sample.detokenizer
            complete = (seq.grammar is not None and seq.max_tokens > 0
                        and advance(seq.grammar, seq.last_token_id))
            if seq.max_tokens == 0:
                detokenizer.finish(seq.token_ids)  # a scored prompt: no text
            elif detokenizer.step(seq.token_ids, reason is FinishReason.STOP,
                                  reason is not None or complete):
                reason = FinishReason.STOP  # a stop string, which comes before max_tokens
            if complete and reason is None:
                reason = FinishReason.STOP  # the structured output is whole
            if reason is not None:
                finished.append((seq, reason))
                request.num_unfinished -= 1
            if request.output_kind is not final_only or request.num_unfinished == 0:
                reporting[request.request_id] = request
        if finished:
            self.scheduler.finish_all(finished)
            for seq, _ in finished:
                del sample_of[seq.seq_id]
                self._gone_seq_ids.append(seq.seq_id)
        return list(reporting.values())

    def _count_finished(self, reason: FinishReason) -> None:
        counts = self.stats.requests_finished
        counts[reason.value] = counts.get(reason.value, 0) + 1

    def stream(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
               prompt: str | None = None,
               output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
               ) -> Iterator[RequestOutput]:
        """Adds one request and steps the engine until it finishes, yielding its outputs (read
        `.delta` for the new text). Other requests in the engine advance too, but their outputs
        from these steps are not returned: serve several at once with `step()` instead."""
        request_id = self.add_request(prompt_token_ids, params, prompt, output_kind)
        try:
            while True:
                for out in self.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort_request(request_id)  # the caller stopped early: free its blocks
