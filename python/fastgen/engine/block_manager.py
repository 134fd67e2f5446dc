"""The paged KV cache's block pool: which of the cache's N blocks are free, which belong to which
sequences, and — with prefix caching — which hold a known run of tokens that a new sequence can
share instead of recomputing.

A sequence of L tokens owns ceil(L / block_size) blocks, listed in order in its block table; the
keys and values of token i live in slot block_table[i // block_size] * block_size + i % block_size.
The manager hands out block ids and never touches the cache tensors (the model runner does).

Blocks are given out as a step needs them: at admission for the cached prefix and the first
prompt chunk, then for each later chunk or decode token (`append_slots`); all are returned on
finish, abort or preemption.

Prefix caching (automatic, as in vLLM and nano-vLLM): every full block of a sequence is named by a
hash chained with its prefix, sha256(parent block's hash + the block's token ids), so equal hashes
mean equal tokens at equal positions — and equal keys and values. When a step is scheduled, the
blocks it will fill are mapped from their hashes (`cache_blocks`), so a sequence admitted later in
the same step already shares them: within each layer every key and value of the step is written
before any attention reads them. (This is how n samples of one prompt share it.) A newly admitted
sequence shares the blocks of its leading full blocks found in that map (a reference count per
block) and starts its prefill after them (`num_cached_tokens`). Its last token is always computed,
so there are logits to sample from: a prompt cached to its end recomputes its last block. Only
full blocks are ever shared and a step writes only past a sequence's full blocks, so no block is
written while shared (`append_slots` asserts it). A request asking for prompt logprobs shares
nothing: it needs the logits of every prompt position.

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

    @property
    def usage(self) -> float:
        """Fraction of the pool held by sequences (evictable cached blocks count as free)."""
        return 1 - self.num_free_blocks / self.num_blocks

    # Admission: blocks for the sequence's leading tokens (its cached prefix and first chunk; by
    # default all of them), the leading full blocks shared where the cache has them.

    def cached_prefix_blocks(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the sequence's leading full blocks, never all of its tokens."""
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return []
        hits = []
        num_blocks = (len(seq) - 1) // self.block_size
        for h in self._hashes(seq, num_blocks)[:num_blocks]:
            block = self._block_of.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        return self._blocks_taken(self.cached_prefix_blocks(seq), seq, num_tokens) \
            <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Fills an empty block table with blocks for the first num_tokens tokens (default: all),
        at least its cached prefix; seq.num_cached_tokens becomes the tokens found cached."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        hits = self.cached_prefix_blocks(seq)
        taken = self._blocks_taken(hits, seq, num_tokens)
        if taken > self.num_free_blocks:
            raise OutOfBlocksError(f"sequence {seq.seq_id} needs {taken} more KV cache blocks, "
                                   f"only {self.num_free_blocks} of {self.num_blocks} are free")
        for block in hits:  # claimed before anything is evicted, so no hit is evicted
            if self._ref_count[block] == 0:
                del self._evictable[block]
            self._ref_count[block] += 1
        needed = max(self.blocks_for(len(seq) if num_tokens is None else num_tokens) - len(hits),
                     0)
        seq.block_table = hits + self._take(needed, seq)
        seq.num_cached_tokens = len(hits) * self.block_size

    def _blocks_taken(self, hits: list[int], seq: Sequence, num_tokens: int | None) -> int:
        """Blocks an allocation removes from the pool: fresh ones past the hits, and the hits
        that are evictable (an evictable hit leaves the pool as surely as a fresh block)."""
        needed = self.blocks_for(len(seq) if num_tokens is None else num_tokens) - len(hits)
        return max(needed, 0) + sum(self._ref_count[b] == 0 for b in hits)

    # Later steps: the table grows to cover the tokens the step writes, positions
    # num_cached_tokens .. num_tokens - 1.

    # These two run for every running sequence at every step: blocks_for and num_free_blocks
    # are written out inline.

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return (-(-num_tokens // self.block_size)
                <= len(seq.block_table) + len(self._free) + len(self._evictable))

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        table = seq.block_table
        end = -(-num_tokens // self.block_size)  # blocks the table must hold
        if end > len(table):
            table.extend(self._take(end - len(table), seq))
        ref_count, hash_of = self._ref_count, self._hash_of
        for i in range(seq.num_cached_tokens // self.block_size, end):
            block = table[i]
            assert ref_count[block] == 1 and hash_of[block] is None, \
                f"sequence {seq.seq_id} would write into shared or cached block {block}"

    def cache_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Makes the full blocks among the sequence's first num_tokens tokens findable by hash,
        once their keys and values are written or scheduled to be (see the module docstring).
        Only blocks completed past num_cached_tokens are looked at: O(1) per decode token."""
        if not self.enable_prefix_caching:
            return
        first = seq.num_cached_tokens // self.block_size
        last = num_tokens // self.block_size
        if first == last:
            return  # no block completed (most decode steps)
        hashes = self._hashes(seq, last)
        for i in range(first, last):
            block, h = seq.block_table[i], hashes[i]
            # A shared block is already named; a block whose tokens another block already holds
            # (both filled in one step before either was named) stays unnamed, and is freed
            # rather than cached.
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
