"""Decides what each engine step feeds the model: continuous batching with chunked prefill, so
prompt chunks and decode tokens share one forward pass under a token budget.

Each step (vLLM v1's policy, without priorities):
1. Running sequences, oldest first: a decoding one takes its one token; one still prefilling takes
   the next chunk of its prompt, as much as the budget (max_num_batched_tokens) has left. When the
   pool cannot give a sequence the blocks its tokens need, the newest running sequence is
   preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
   (prompt + output so far) later — mostly from the prefix cache, which keeps its full blocks.
2. Waiting sequences, in arrival order, while budget is left, the running set is below
   max_num_seqs and the pool has their blocks: admitted with their cached prefix (prefix caching)
   and a first chunk of the rest.
So a long prompt never stalls the running sequences' decoding: it is fed a budget's remainder at a
time, between their tokens. A request that could never run (a prompt beyond the context, or more
blocks than the whole cache) is refused by `add`, so the queue never holds one that blocks it.

The scheduler is the one owner of a sequence's progress: `schedule()` returns an immutable
ScheduledBatch, the model runner computes on a ModelInput built from it and returns a
ModelOutput, and `update_from_output` applies that: the fed tokens count as cached, sampled
tokens are appended, and the token-level stop conditions (a stop token id or EOS, max_tokens) are
checked here, in one place. Stop strings need the text, so the engine checks those after
detokenizing and finishes such sequences through `finish_all`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fastgen.engine.block_manager import BlockManager
from fastgen.engine.model_input import ModelInput, ModelOutput
from fastgen.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledBatch:
    """A step's sequences, in order: seqs[b] feeds num_scheduled[b] tokens after its cached
    ones. Made fresh by each schedule() and never changed: the counts are those of the step,
    whatever happens to the sequences afterwards."""

    seqs: list[Sequence]
    num_scheduled: list[int]
    num_prefill_tokens: int    # prompt (or recomputed) tokens among them
    admitted: list[Sequence]   # those of seqs taken from the queue by this step

    @property
    def num_tokens(self) -> int:
        """Tokens this step feeds the model."""
        return sum(self.num_scheduled)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_tokens - self.num_prefill_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence; ValueError when it could never be scheduled."""
        self.check(seq.num_prompt_tokens, seq.max_tokens)
        self.waiting.append(seq)

    def check(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """ValueError when a prompt of this length with this max_tokens could never run."""
        # Without generation (scoring), the prompt may fill the context.
        limit = self.max_model_len - (1 if max_tokens > 0 else 0)
        if num_prompt_tokens > limit:
            raise ValueError(f"the prompt has {num_prompt_tokens} tokens, but the model's "
                             f"context is {self.max_model_len} tokens (prompt plus at least one "
                             f"generated token must fit)")
        total = min(num_prompt_tokens + max_tokens, self.max_model_len)
        blocks = self.block_manager.blocks_for(total)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"the prompt and its max_tokens ({total} tokens) need {blocks} KV "
                             f"cache blocks, but the whole cache has "
                             f"{self.block_manager.num_blocks}; lower max_tokens or give the "
                             f"cache more memory")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, or None when nothing is queued or running. Gives each scheduled
        sequence the blocks its tokens need."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        admitted: list[Sequence] = []
        bm = self.block_manager

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below while making room for an earlier one
            num_new = min(len(seq) - seq.num_cached_tokens, budget)
            end = seq.num_cached_tokens + num_new
            while not bm.can_append(seq, end):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it was the newest: nothing left to preempt for it
            bm.append_slots(seq, end)
            self._take(seq, num_new, scheduled)
            budget -= num_new

        preempted = self.num_preemptions
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and self.num_preemptions == preempted):  # no admissions in a step short of blocks
            seq = self.waiting[0]
            cached = len(bm.cached_prefix_blocks(seq)) * bm.block_size
            num_new = min(len(seq) - cached, budget)
            if not bm.can_allocate(seq, cached + num_new):
                break
            bm.allocate(seq, cached + num_new)  # sets seq.num_cached_tokens to `cached`
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            admitted.append(seq)
            self._take(seq, num_new, scheduled)
            budget -= num_new

        if not scheduled:
            return None
        seqs = [seq for seq, _ in scheduled]
        counts = [count for _, count in scheduled]
        prefill = sum(count for seq, count in scheduled if seq.is_prefilling)
        return ScheduledBatch(seqs, counts, prefill, admitted)

    def _take(self, seq: Sequence, num_new: int, scheduled: list[tuple[Sequence, int]]) -> None:
        # Named now, so a sequence admitted after it in this same step shares them.
        self.block_manager.cache_blocks(seq, seq.num_cached_tokens + num_new)
        scheduled.append((seq, num_new))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update_from_output(self, batch: ScheduledBatch, model_input: ModelInput,
                           output: ModelOutput) -> list[tuple[Sequence, FinishReason | None]]:
        """Applies a step's output: every fed token counts as cached, each sampled token is
        appended to its sequence (with its logprobs), prompt logprobs are added. Returns, in
        batch order, each sequence that got a token, with the reason it stops (a stop token id,
        or max_tokens reached; None to go on), and each scored prompt (max_tokens 0) now fully
        fed, with LENGTH. Finishing them is the caller's (finish_all), after its stop-string
        checks."""
        seqs = batch.seqs
        for seq, count in zip(seqs, batch.num_scheduled):
            seq.num_cached_tokens += count
        for row, entries in zip(model_input.prompt_logprobs, output.prompt_logprobs):
            seqs[row.row].prompt_logprobs.extend(entries)
        sampled = dict(zip(model_input.sampling.rows,
                           zip(output.sampled_token_ids, output.logprobs)))
        updates: list[tuple[Sequence, FinishReason | None]] = []
        for b, seq in enumerate(seqs):
            token_and_logprobs = sampled.get(b)
            if token_and_logprobs is not None:
                token, logprobs = token_and_logprobs
                seq.append_token(token, logprobs)
                updates.append((seq, stop_reason(seq, token)))
            elif seq.max_tokens == 0 and seq.num_cached_tokens == len(seq):
                updates.append((seq, FinishReason.LENGTH))  # a scored prompt: nothing to generate
        return updates

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Marks a running sequence finished and returns its blocks."""
        self.finish_all([(seq, reason)])

    def finish_all(self, finished: list[tuple[Sequence, FinishReason]]) -> None:
        """finish() for each (sequence, reason), in order, in one pass over the running list
        (a step may finish the whole batch)."""
        for seq, reason in finished:
            seq.finish(reason)
            self.block_manager.free(seq)
        self.running = [seq for seq in self.running if seq.status is SequenceStatus.RUNNING]

    def abort(self, seq: Sequence) -> None:
        """Drops a sequence wherever it is; a no-op when it has finished."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        if not seq.is_finished:
            seq.finish(FinishReason.ABORT)


def stop_reason(seq: Sequence, token: int) -> FinishReason | None:
    """Why a sequence stops after appending token: a stop token id (EOS among them unless
    ignore_eos) is STOP, reaching max_tokens is LENGTH; None to go on."""
    if token in seq.stop_token_ids:
        return FinishReason.STOP
    if seq.num_output_tokens >= seq.max_tokens:
        return FinishReason.LENGTH
    return None
