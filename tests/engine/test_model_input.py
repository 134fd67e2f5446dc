"""The step's contract between engine and runner: a ModelInput built from scheduled sequences is
plain data (it round-trips through pickle, as it will to tensor-parallel workers), and the
scheduler applying a ModelOutput advances every sequence, appends sampled tokens, adds prompt
logprobs, and gives each the right stop reason."""

from __future__ import annotations

import pickle

from fastgen.config import SamplingParams
from fastgen.engine.block_manager import BlockManager
from fastgen.engine.model_input import ModelOutput, build_model_input
from fastgen.engine.scheduler import Scheduler
from fastgen.engine.sequence import FinishReason, Sequence

BLOCK_SIZE = 4
EOS = 2


def scheduler_with(*seqs: Sequence, budget: int = 12) -> Scheduler:
    sched = Scheduler(BlockManager(64, BLOCK_SIZE, enable_prefix_caching=False), max_num_seqs=8,
                      max_num_batched_tokens=budget, max_model_len=64)
    for seq in seqs:
        sched.add(seq)
    return sched


def test_model_input_is_plain_data():
    seqs = [Sequence(0, [5, 6, 7, 8, 9], SamplingParams(seed=3, repetition_penalty=1.2,
                                                        logprobs=2), 8, index=1),
            Sequence(1, [4] * 9, SamplingParams(prompt_logprobs=1), 8)]
    sched = scheduler_with(*seqs)
    batch = sched.schedule()  # 5 tokens and 7 of the 9
    model_input = build_model_input(batch.seqs, batch.num_scheduled, BLOCK_SIZE, [11, 12])
    assert model_input.input_ids == [5, 6, 7, 8, 9, 4, 4, 4, 4, 4, 4, 4]
    assert model_input.positions == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert model_input.cu_seqlens_q == [0, 5, 12] and model_input.seq_lens == [5, 7]
    assert model_input.sampling.rows == [0] and model_input.sampling.seeds == [4]  # seed + index
    assert model_input.sampling.histories[0].token_ids == [5, 6, 7, 8, 9]
    (row,) = model_input.prompt_logprobs
    assert (row.row, row.start, row.targets) == (1, 0, [4] * 7)  # positions 0..6 predict 1..7
    assert not model_input.is_decode and model_input.finished_seq_ids == [11, 12]
    assert pickle.loads(pickle.dumps(model_input)) == model_input


def test_scheduler_applies_the_output():
    going = Sequence(0, [5, 6, 7], SamplingParams(max_tokens=8), 8, eos_token_ids=(EOS,))
    eos = Sequence(1, [5, 6], SamplingParams(max_tokens=8), 8, eos_token_ids=(EOS,))
    ignoring = Sequence(2, [5, 6], SamplingParams(max_tokens=8, ignore_eos=True), 8,
                        eos_token_ids=(EOS,))
    stop_id = Sequence(3, [5], SamplingParams(stop_token_ids=[9]), 8)
    last = Sequence(4, [5, 6], SamplingParams(max_tokens=1), 1)
    scored = Sequence(5, [5, 6, 7], SamplingParams(max_tokens=0, prompt_logprobs=0), 0)
    chunked = Sequence(6, [3] * 20, SamplingParams(), 8)
    seqs = [going, eos, ignoring, stop_id, last, scored, chunked]
    sched = scheduler_with(*seqs, budget=20)
    batch = sched.schedule()
    assert batch.num_scheduled == [3, 2, 2, 1, 2, 3, 7]  # the last prompt in part
    assert (batch.num_prefill_tokens, batch.num_decode_tokens) == (20, 0)
    model_input = build_model_input(batch.seqs, batch.num_scheduled, BLOCK_SIZE)
    rows = model_input.sampling.rows
    tokens = {0: 11, 1: EOS, 2: EOS, 3: 9, 4: 12}
    output = ModelOutput([tokens[b] for b in rows], [None] * len(rows),
                         [[{7: -0.5}] * len(r.targets) for r in model_input.prompt_logprobs])
    updates = sched.update_from_output(batch, model_input, output)
    assert (batch.num_prefill_tokens, batch.num_tokens) == (20, 20)  # a snapshot: unchanged
    assert [(seq.seq_id, reason) for seq, reason in updates] == [
        (0, None), (1, FinishReason.STOP), (2, None), (3, FinishReason.STOP),
        (4, FinishReason.LENGTH), (5, FinishReason.LENGTH)]
    assert going.token_ids == [5, 6, 7, 11] and eos.token_ids == [5, 6, EOS]
    assert [s.num_cached_tokens for s in seqs] == [3, 2, 2, 1, 2, 3, 7]
    assert len(chunked) == 20  # a chunk short of its end samples nothing
    assert scored.prompt_logprobs == [{7: -0.5}] * 2
    # nothing is finished until the caller says so (it checks stop strings first)
    assert all(not s.is_finished for s in seqs)
    sched.finish_all([(seq, reason) for seq, reason in updates if reason is not None])
    assert sched.running == [going, ignoring, chunked]
