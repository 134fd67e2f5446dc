"""The paged KV cache's block pool: which of the cache's N blocks are free, and which belong to
which sequence.

A sequence of L tokens owns ceil(L / block_size) blocks, listed in order in its block table; the
keys and values of token i live in slot block_table[i // block_size] * block_size + i % block_size.
The manager hands out block ids and never touches the cache tensors (the model runner does).

Blocks are allocated whole-sequence at admission and one at a time while decoding, and returned on
finish or preemption. Prefix caching will add reference counts and a hash of each full block here;
every allocation already goes through `_take` and every release through `_give_back` for that.
"""

from __future__ import annotations

from collections import deque

from fastgen.engine.sequence import Sequence


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than an allocation needs (the scheduler checks first)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """How many blocks hold num_tokens tokens."""
        return (num_tokens + self.block_size - 1) // self.block_size

    # Admission: blocks for every token of the sequence (the prompt, or prompt + output when a
    # preempted sequence is recomputed).

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) - len(seq.block_table) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        needed = self.blocks_for(len(seq)) - len(seq.block_table)
        seq.block_table.extend(self._take(needed, seq))

    # Decoding: the newest token is written at position len(seq) - 1; a new block is needed when
    # that position starts one.

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= len(seq.block_table) + len(self._free)

    def append_slot(self, seq: Sequence) -> None:
        needed = self.blocks_for(len(seq)) - len(seq.block_table)
        if needed > 0:
            seq.block_table.extend(self._take(needed, seq))

    def free(self, seq: Sequence) -> None:
        """Returns the sequence's blocks to the pool; its cached tokens are gone."""
        self._give_back(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def _take(self, count: int, seq: Sequence) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"sequence {seq.seq_id} needs {count} more KV cache blocks, "
                                   f"only {len(self._free)} of {self.num_blocks} are free")
        return [self._free.popleft() for _ in range(count)]

    def _give_back(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)
