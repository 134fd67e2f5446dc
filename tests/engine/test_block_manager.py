"""The KV cache block pool: whole-sequence allocation, one block at a time while decoding,
disjoint tables, everything returned on free, and a clear error when the pool runs dry."""

import pytest

from fastgen.config import SamplingParams
from fastgen.engine.block_manager import BlockManager, OutOfBlocksError
from fastgen.engine.sequence import Sequence


def make_seq(num_tokens: int, seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, list(range(1, num_tokens + 1)), SamplingParams(), max_tokens=16)


def test_allocate_covers_every_token_and_free_returns_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(9)  # 3 blocks: 4 + 4 + 1
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 7
    bm.free(seq)
    assert seq.block_table == [] and seq.num_cached_tokens == 0
    assert bm.num_free_blocks == 10


def test_append_slots_adds_a_block_only_when_crossing_a_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(4)
    bm.allocate(seq)
    seq.num_cached_tokens = 4
    assert len(seq.block_table) == 1
    seq.append_token(5)  # token 4 (0-based) starts block 1
    assert bm.can_append(seq, len(seq))
    bm.append_slots(seq, len(seq))
    assert len(seq.block_table) == 2
    for token in range(6, 9):  # tokens 5..7 fill block 1
        seq.num_cached_tokens = len(seq)
        seq.append_token(token)
        bm.append_slots(seq, len(seq))
    assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 2


def test_allocate_can_cover_only_a_first_chunk():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(20)
    assert bm.can_allocate(seq, 6)
    bm.allocate(seq, 6)  # a 6-token first chunk: two blocks, not five
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    seq.num_cached_tokens = 6
    bm.append_slots(seq, 20)
    assert len(seq.block_table) == 5 and bm.num_free_blocks == 3


def test_running_out_of_blocks_is_a_clear_error():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(12)
    assert not bm.can_allocate(seq)
    with pytest.raises(OutOfBlocksError, match="needs 3 more KV cache blocks, only 2 of 2"):
        bm.allocate(seq)
    assert bm.num_free_blocks == 2  # nothing taken


def test_sequences_get_disjoint_blocks():
    bm = BlockManager(num_blocks=8, block_size=2)
    seqs = [make_seq(n, i) for i, n in enumerate((3, 4, 1))]
    for seq in seqs:
        bm.allocate(seq)
    taken = [b for seq in seqs for b in seq.block_table]
    assert len(taken) == len(set(taken)) == 5


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)
