"""The scheduler on its own, with a stand-in for the model runner: prefill admission within the
token and sequence budgets, decode, preemption of the newest sequence when blocks run out,
refusal at add of prompts that could never run, finish and abort."""

import pytest

from fastgen.config import SamplingParams
from fastgen.engine.block_manager import BlockManager
from fastgen.engine.scheduler import Scheduler, StepKind
from fastgen.engine.sequence import FinishReason, Sequence, SequenceStatus


def make_seq(seq_id: int, num_tokens: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, [1] * num_tokens, SamplingParams(max_tokens=max_tokens), max_tokens)


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=64, max_len=128):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, max_tokens, max_len)


def run_step(scheduler: Scheduler, batch) -> None:
    """What the model runner and engine do with a batch: cache its tokens, append one each."""
    for seq in batch.seqs:
        seq.num_cached_tokens = len(seq)
        seq.append_token(7)


def test_prefill_admits_within_token_budget_then_decodes():
    sched = make_scheduler(max_tokens=20)
    seqs = [make_seq(i, n) for i, n in enumerate((8, 8, 8))]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    assert batch.kind is StepKind.PREFILL and batch.seqs == seqs[:2] and batch.num_tokens == 16
    run_step(sched, batch)
    batch = sched.schedule()  # the third still fits a prefill step of its own
    assert batch.kind is StepKind.PREFILL and batch.seqs == seqs[2:]
    run_step(sched, batch)
    batch = sched.schedule()
    assert batch.kind is StepKind.DECODE and batch.seqs == seqs and batch.num_tokens == 3
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)


def test_max_num_seqs_bounds_the_running_set():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(i, 3) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == seqs[:2]
    run_step(sched, batch)
    assert sched.schedule().kind is StepKind.DECODE
    sched.finish(seqs[0], FinishReason.STOP)
    batch = sched.schedule()
    assert batch.kind is StepKind.PREFILL and batch.seqs == [seqs[2]]


def test_finish_frees_blocks():
    sched = make_scheduler(num_blocks=8)
    seq = make_seq(0, 10)
    sched.add(seq)
    run_step(sched, sched.schedule())
    assert sched.block_manager.num_free_blocks == 5
    sched.finish(seq, FinishReason.LENGTH)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.LENGTH
    assert sched.block_manager.num_free_blocks == 8 and not sched.has_unfinished()


def test_decode_preempts_the_newest_sequence_when_blocks_run_out():
    sched = make_scheduler(num_blocks=4, block_size=4)
    first, second = make_seq(0, 8), make_seq(1, 8)  # two blocks each: the pool is full
    sched.add(first)
    sched.add(second)
    run_step(sched, sched.schedule())
    batch = sched.schedule()  # both need a third block for token 8
    assert batch.kind is StepKind.DECODE and batch.seqs == [first]
    assert second.status is SequenceStatus.WAITING and second.block_table == []
    assert second.num_cached_tokens == 0 and list(sched.waiting) == [second]
    sched.finish(first, FinishReason.STOP)
    batch = sched.schedule()  # recomputed: prompt and the token generated so far
    assert batch.kind is StepKind.PREFILL and batch.seqs == [second] and batch.num_tokens == 9


def test_prompts_that_can_never_run_are_refused_at_add():
    sched = make_scheduler(num_blocks=4, block_size=4, max_tokens=64, max_len=32)
    with pytest.raises(ValueError, match="context is 32 tokens"):
        sched.add(make_seq(0, 32))
    with pytest.raises(ValueError, match="the whole cache has 4"):
        sched.add(make_seq(1, 20, max_tokens=8))  # 28 tokens need 7 blocks
    sched = make_scheduler(max_tokens=16)
    with pytest.raises(ValueError, match="max_num_batched_tokens=16"):
        sched.add(make_seq(2, 17))
    assert not sched.has_unfinished()


def test_abort_removes_a_waiting_or_running_sequence():
    sched = make_scheduler(num_blocks=8)
    running, waiting = make_seq(0, 4), make_seq(1, 4)
    sched.add(running)
    run_step(sched, sched.schedule())
    sched.add(waiting)
    sched.abort(waiting)
    sched.abort(running)
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 8
    assert sched.schedule() is None
