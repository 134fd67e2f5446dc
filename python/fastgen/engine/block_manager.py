"""The paged KV cache's block pool: which of the cache's N blocks are free, which belong to which
sequences, and — with prefix caching — which hold a known run of tokens that a new sequence can
share instead of recomputing.

A sequence of L tokens owns ceil(L / block_size) blocks, listed in order in its block table; the
keys and values of token i live in slot block_table[i // block_size] * block_size + i % block_size.
The manager hands out block ids and never touches the cache tensors (the model runner does).

Blocks are allocated whole-sequence at admission and one at a time while decoding, and returned on
finish or preemption.

Prefix caching (automatic, as in vLLM and nano-vLLM): every full block of a sequence is named by a
hash chained with its prefix, sha256(parent block's hash + the block's token ids), so equal hashes
mean equal tokens at equal positions — and equal keys and values. Once a block's keys and values
are written (`cache_full_blocks`, after the step that wrote them), the manager maps its hash to
it. A newly admitted sequence shares the blocks of its leading full blocks found in that map (a
reference count per block) and starts its prefill after them (`num_cached_tokens`). Its last token
is always computed, so there are logits to sample from: a prompt cached to its end recomputes its
last block. Only full blocks are ever shared and decoding writes only past a sequence's full
blocks, so no block is written while shared (`append_slot` asserts it).

A block whose count drops to 0 keeps its hash and goes to an LRU of evictable blocks: it is reused
as is by a sequence that hits it, or, once the never-hashed free blocks run out, evicted oldest
first — its hash dropped — to be written with new tokens. sha256 rather than Python's hash():
a collision would silently serve another prompt's keys and values, and tuple hashes are easy to
collide on purpose.
"""

from __future__ import annotations

import array
import hashlib
from collections import OrderedDict, deque

from fastgen.engine.sequence import Sequence


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than an allocation needs (the scheduler checks first)."""


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """sha256(parent || token ids as int64): the name of a full block whose prefix hashes to parent
    (b"" for the first block)."""
    return hashlib.sha256(parent + array.array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # count 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # count 0, hashed; oldest first
        self._ref_count = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}  # hash -> block whose contents are written

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never-hashed ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose contents are known by hash, in use or evictable."""
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        """How many blocks hold num_tokens tokens."""
        return (num_tokens + self.block_size - 1) // self.block_size

    # Admission: blocks for every token of the sequence (the prompt, or prompt + output when a
    # preempted sequence is recomputed), the leading ones shared where the cache has them.

    def cached_prefix_blocks(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the sequence's leading full blocks, never all of its tokens."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        num_blocks = (len(seq) - 1) // self.block_size
        for h in self._hashes(seq, num_blocks)[:num_blocks]:
            block = self._block_of.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self.cached_prefix_blocks(seq)
        # An evictable hit leaves the pool as surely as a fresh block does.
        taken = self.blocks_for(len(seq)) - len(hits) + sum(self._ref_count[b] == 0 for b in hits)
        return taken <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Fills an empty block table; seq.num_cached_tokens becomes the tokens found cached."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        hits = self.cached_prefix_blocks(seq)
        needed = self.blocks_for(len(seq)) - len(hits)
        if not self.can_allocate(seq):
            raise OutOfBlocksError(f"sequence {seq.seq_id} needs {needed} more KV cache blocks, "
                                   f"only {self.num_free_blocks} of {self.num_blocks} are free")
        for block in hits:  # claimed before anything is evicted, so no hit is evicted
            if self._ref_count[block] == 0:
                del self._evictable[block]
            self._ref_count[block] += 1
        seq.block_table = hits + self._take(needed, seq)
        seq.num_cached_tokens = len(hits) * self.block_size

    # Decoding: the newest token is written at position len(seq) - 1; a new block is needed when
    # that position starts one.

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= len(seq.block_table) + self.num_free_blocks

    def append_slot(self, seq: Sequence) -> None:
        needed = self.blocks_for(len(seq)) - len(seq.block_table)
        if needed > 0:
            seq.block_table.extend(self._take(needed, seq))
        block = seq.block_table[(len(seq) - 1) // self.block_size]
        assert self._ref_count[block] == 1 and self._hash_of[block] is None, \
            f"decoding sequence {seq.seq_id} would write into shared or cached block {block}"

    def cache_full_blocks(self, seq: Sequence, num_new_tokens: int) -> None:
        """Makes the blocks that the step just run filled findable by hash. The step wrote the
        keys and values of the last num_new_tokens of the sequence's num_cached_tokens tokens; only
        the blocks those complete are looked at, so a decode step costs O(1) per sequence."""
        if not self.enable_prefix_caching:
            return
        first = (seq.num_cached_tokens - num_new_tokens) // self.block_size
        last = seq.num_cached_tokens // self.block_size
        hashes = self._hashes(seq, last)
        for i in range(first, last):
            block, h = seq.block_table[i], hashes[i]
            # A shared block is already named; a block whose tokens another block already holds
            # (both prefilled in one step) stays unnamed, and is freed rather than cached.
            if self._hash_of[block] is None and h not in self._block_of:
                self._hash_of[block] = h
                self._block_of[h] = block

    def free(self, seq: Sequence) -> None:
        """Drops the sequence's hold on its blocks; its cached tokens are gone from it. Blocks are
        released last first, so a prompt's tail is evicted before its head (shared more often)."""
        for block in reversed(seq.block_table):
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                if self._hash_of[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None
        seq.block_table = []
        seq.num_cached_tokens = 0

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """seq.block_hashes, extended to cover at least its first num_blocks full blocks. Each is
        computed once per sequence: its tokens never change, only grow."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_blocks):
            hashes.append(block_hash(hashes[-1] if hashes else b"",
                                     seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def _take(self, count: int, seq: Sequence) -> list[int]:
        if count > self.num_free_blocks:
            raise OutOfBlocksError(f"sequence {seq.seq_id} needs {count} more KV cache blocks, "
                                   f"only {self.num_free_blocks} of {self.num_blocks} are free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of[block]]
                self._hash_of[block] = None
            self._ref_count[block] = 1
            blocks.append(block)
        return blocks
