"""Decides what each engine step runs: a prefill of newly admitted sequences, or one decode token
for every running sequence (continuous batching: sequences join and leave the running batch
between steps).

Policy, in the shape of nano-vLLM's:
- Prefill first. Waiting sequences are admitted in arrival order while the step stays within
  max_num_batched_tokens, the running set within max_num_seqs, and the pool has their blocks.
- Otherwise decode all running sequences. When the pool cannot give a sequence the block its next
  token needs, the most recently admitted running sequence is preempted: its blocks are freed and
  it goes back to the front of the queue, to be recomputed (prompt + output so far) by a later
  prefill.
A request that could never run (prompt beyond the context, or more blocks than the whole cache) is
refused by `add`, so the queue never holds one that blocks it forever.

Seams for later work: chunked prefill will let `_schedule_prefill` take part of a prompt
(Sequence.num_cached_tokens already says where a prefill starts) and mix it into decode steps.
Prefix caching lives in the block manager: admission asks it which leading blocks are cached, and
a prefill feeds only the tokens after them.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from fastgen.engine.block_manager import BlockManager
from fastgen.engine.sequence import FinishReason, Sequence, SequenceStatus


class StepKind(enum.Enum):
    PREFILL = "prefill"  # every new token of each sequence: its prompt (or all of it, if recomputed)
    DECODE = "decode"    # one token per sequence


@dataclass
class ScheduledBatch:
    kind: StepKind
    seqs: list[Sequence]
    num_tokens: int  # tokens this step feeds the model


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

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence; ValueError when it could never be scheduled."""
        prompt_len = seq.num_prompt_tokens
        if prompt_len >= self.max_model_len:
            raise ValueError(f"the prompt has {prompt_len} tokens, but the model's context is "
                             f"{self.max_model_len} tokens (prompt plus at least one generated "
                             f"token must fit)")
        if prompt_len > self.max_num_batched_tokens:
            raise ValueError(f"the prompt has {prompt_len} tokens, more than "
                             f"max_num_batched_tokens={self.max_num_batched_tokens} one step may "
                             f"process; raise max_num_batched_tokens")
        total = min(prompt_len + seq.max_tokens, self.max_model_len)
        blocks = self.block_manager.blocks_for(total)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"the prompt and its max_tokens ({total} tokens) need {blocks} KV "
                             f"cache blocks, but the whole cache has "
                             f"{self.block_manager.num_blocks}; lower max_tokens or give the "
                             f"cache more memory")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, or None when nothing is queued or running."""
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(seqs) < self.max_num_seqs:
            seq = self.waiting[0]
            # Tokens found in the prefix cache are not fed again.
            bm = self.block_manager
            cached = len(bm.cached_prefix_blocks(seq)) * bm.block_size
            new_tokens = len(seq) - cached
            # A lone sequence always fits: a preempted one may have grown past the budget.
            if seqs and num_tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not bm.can_allocate(seq):
                break
            bm.allocate(seq)  # sets seq.num_cached_tokens to `cached`
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            seqs.append(seq)
            num_tokens += new_tokens
        if not seqs:
            return None
        self.running.extend(seqs)
        return ScheduledBatch(StepKind.PREFILL, seqs, num_tokens)

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below while making room for an earlier one
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.append_slot(seq)
                scheduled.append(seq)
        if not scheduled:
            return None
        return ScheduledBatch(StepKind.DECODE, scheduled, len(scheduled))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Marks a running sequence finished and returns its blocks."""
        seq.finish(reason)
        self.running.remove(seq)
        self.block_manager.free(seq)

    def abort(self, seq: Sequence) -> None:
        """Drops a sequence wherever it is; a no-op when it has finished."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        if not seq.is_finished:
            seq.finish(FinishReason.STOP)
