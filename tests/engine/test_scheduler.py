"""The scheduler on its own, with a stand-in for the model runner: continuous batching with
chunked prefill under the token budget (decodes first, then prompt chunks), the running-set cap,
preemption of the newest sequence when blocks run out, refusal at add of prompts that could never
run, finish and abort."""

import pytest

from fastgen.config import SamplingParams
from fastgen.engine.block_manager import BlockManager
from fastgen.engine.model_input import ModelOutput, build_model_input
from fastgen.engine.scheduler import Scheduler
from fastgen.engine.sequence import FinishReason, Sequence, SequenceStatus


def make_seq(seq_id: int, num_tokens: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, [1] * num_tokens, SamplingParams(max_tokens=max_tokens), max_tokens)


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=64, max_len=128,
                   prefix_caching=False):
    return Scheduler(BlockManager(num_blocks, block_size, prefix_caching), max_num_seqs,
                     max_tokens, max_len)


BLOCK_SIZE = 4  # every scheduler here has it


def run_step(batch) -> None:
    """What the model runner and engine do with a batch: cache the fed tokens, and append a
    token (7) to each sequence the step brought to its end, applied as the scheduler does."""
    model_input = build_model_input(batch.seqs, batch.num_scheduled, BLOCK_SIZE)
    rows = len(model_input.sampling)
    output = ModelOutput([7] * rows, [None] * rows, [])
    make_scheduler().update_from_output(batch, model_input, output)


def chunks(batch) -> list[tuple[int, int]]:
    return [(seq.seq_id, count) for seq, count in zip(batch.seqs, batch.num_scheduled)]


def test_prompts_are_chunked_to_the_token_budget():
    sched = make_scheduler(max_tokens=20)
    seqs = [make_seq(i, n) for i, n in enumerate((8, 8, 8))]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()  # two whole prompts and 4 tokens of the third
    assert chunks(batch) == [(0, 8), (1, 8), (2, 4)] and batch.num_tokens == 20
    assert batch.num_prefill_tokens == 20 and batch.admitted == seqs
    run_step(batch)
    assert len(seqs[2]) == 8  # mid-prompt: nothing sampled yet
    batch = sched.schedule()  # two decodes and the rest of the third prompt, in one step
    assert chunks(batch) == [(0, 1), (1, 1), (2, 4)]
    assert batch.num_decode_tokens == 2 and batch.num_prefill_tokens == 4
    run_step(batch)
    batch = sched.schedule()
    assert chunks(batch) == [(0, 1), (1, 1), (2, 1)] and batch.num_decode_tokens == 3
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)


def test_a_long_prompt_does_not_stall_decoding():
    sched = make_scheduler(max_tokens=8, num_blocks=64)
    short, long = make_seq(0, 3), make_seq(1, 40)
    sched.add(short)
    run_step(sched.schedule())
    sched.add(long)
    steps = []
    while not long.output_token_ids:  # the short one decodes in every step of the long prefill
        batch = sched.schedule()
        steps.append(chunks(batch))
        run_step(batch)
    assert steps == [[(0, 1), (1, 7)]] * 5 + [[(0, 1), (1, 5)]]
    assert len(short.output_token_ids) == 7


def test_max_num_seqs_bounds_the_running_set():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(i, 3) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == seqs[:2]
    run_step(batch)
    assert sched.schedule().seqs == seqs[:2]
    sched.finish(seqs[0], FinishReason.STOP)
    batch = sched.schedule()
    assert chunks(batch) == [(1, 1), (2, 3)]


def test_finish_frees_blocks():
    sched = make_scheduler(num_blocks=8)
    seq = make_seq(0, 10)
    sched.add(seq)
    run_step(sched.schedule())
    assert sched.block_manager.num_free_blocks == 5
    sched.finish(seq, FinishReason.LENGTH)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.LENGTH
    assert sched.block_manager.num_free_blocks == 8 and not sched.has_unfinished()


def test_decode_preempts_the_newest_sequence_when_blocks_run_out():
    sched = make_scheduler(num_blocks=4, block_size=4)
    first, second = make_seq(0, 8), make_seq(1, 8)  # two blocks each: the pool is full
    sched.add(first)
    sched.add(second)
    run_step(sched.schedule())
    batch = sched.schedule()  # both need a third block for token 8
    assert chunks(batch) == [(0, 1)] and sched.num_preemptions == 1
    assert second.status is SequenceStatus.WAITING and second.block_table == []
    assert second.num_cached_tokens == 0 and list(sched.waiting) == [second]
    run_step(batch)
    sched.finish(first, FinishReason.STOP)
    batch = sched.schedule()  # recomputed: prompt and the token generated so far
    assert chunks(batch) == [(1, 9)] and batch.num_prefill_tokens == 9


def test_preempted_sequences_recompute_from_the_prefix_cache():
    sched = make_scheduler(num_blocks=5, block_size=4, prefix_caching=True)
    first, second = make_seq(0, 8), make_seq(1, 8)
    second.token_ids = [2] * 8  # different tokens: nothing shared between the two
    sched.add(first)
    sched.add(second)
    run_step(sched.schedule())
    for _ in range(4):  # both decode into their third block, then first needs a fourth
        run_step(sched.schedule())
    assert second.status is SequenceStatus.WAITING
    sched.finish(first, FinishReason.STOP)
    batch = sched.schedule()  # its two full prompt blocks are still cached: only the rest is fed
    assert batch.admitted == [second] and second.num_cached_tokens == 8
    assert chunks(batch) == [(1, len(second) - 8)]


def test_prompts_that_can_never_run_are_refused_at_add():
    sched = make_scheduler(num_blocks=4, block_size=4, max_tokens=64, max_len=32)
    with pytest.raises(ValueError, match="context is 32 tokens"):
        sched.add(make_seq(0, 32))
    with pytest.raises(ValueError, match="the whole cache has 4"):
        sched.add(make_seq(1, 20, max_tokens=8))  # 28 tokens need 7 blocks
    sched.add(make_seq(2, 16, max_tokens=0))  # scoring only: may fill the context
    assert len(sched.waiting) == 1


def test_abort_removes_a_waiting_or_running_sequence():
    sched = make_scheduler(num_blocks=8)
    running, waiting = make_seq(0, 4), make_seq(1, 4)
    sched.add(running)
    run_step(sched.schedule())
    sched.add(waiting)
    sched.abort(waiting)
    sched.abort(running)
    assert running.finish_reason is FinishReason.ABORT
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 8
    assert sched.schedule() is None
