"""Prefix caching. The block manager on its own: chained block hashes, sharing full blocks with
reference counts, never sharing a partial block or a whole sequence, evicting the least recently
freed cached block first and forgetting its hash. End to end on the tiny float32 Llama: greedy
tokens are the same with the cache on and off, and a request whose prefix is cached prefills only
the tokens after it — also when the cache is too small to keep everything."""

import pytest
import torch
from fastgen import LLM, SamplingParams
from fastgen.engine.block_manager import BlockManager, block_hash
from fastgen.engine.sequence import Sequence

from tests.engine.tiny_model import save_tiny_llama


def make_seq(token_ids: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, token_ids, SamplingParams(), max_tokens=16)


def admit(bm: BlockManager, token_ids: list[int], seq_id: int = 0) -> Sequence:
    """Allocates a sequence and does what a prefill step does to the cache: writes every token."""
    seq = make_seq(token_ids, seq_id)
    bm.allocate(seq)
    bm.cache_blocks(seq, len(seq))
    seq.num_cached_tokens = len(seq)
    return seq


# The block manager.

def test_block_hashes_chain_with_their_prefix():
    first = block_hash(b"", [1, 2, 3, 4])
    assert first == block_hash(b"", [1, 2, 3, 4]) != block_hash(b"", [1, 2, 3, 5])
    assert block_hash(first, [5, 6, 7, 8]) != block_hash(block_hash(b"", [0, 2, 3, 4]),
                                                         [5, 6, 7, 8])
    bm = BlockManager(num_blocks=16, block_size=4)
    a = admit(bm, list(range(1, 13)), 0)
    b = admit(bm, [1, 2, 3, 4, 9, 9, 9, 9, 9, 10, 11, 12], 1)  # its third block equals a's
    assert a.block_hashes[0] == b.block_hashes[0] == first
    assert a.block_hashes[1] != b.block_hashes[1] and a.block_hashes[2] != b.block_hashes[2]


def test_full_blocks_are_shared_with_reference_counts():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = admit(bm, list(range(1, 11)), 0)  # 4 + 4 + 2: two full blocks cached
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 7
    b = make_seq(list(range(1, 9)) + [99, 98, 97], 1)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    assert b.num_cached_tokens == 8 and bm.num_free_blocks == 6
    shared = b.block_table[:2]
    bm.free(a)  # the shared blocks stay with b; a's partial block is free again
    assert bm.num_free_blocks == 7
    bm.free(b)
    assert bm.num_free_blocks == 10 and bm.num_cached_blocks == 2  # evictable, not forgotten
    c = make_seq(list(range(1, 13)), 2)
    bm.allocate(c)  # reuses the evictable blocks
    assert c.block_table[:2] == shared and c.num_cached_tokens == 8


def test_a_fully_cached_prompt_recomputes_its_last_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = admit(bm, list(range(1, 9)), 0)
    b = make_seq(list(range(1, 9)), 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]


def test_partial_blocks_are_never_shared():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = admit(bm, [1, 2, 3, 4, 5, 6], 0)
    assert bm.num_cached_blocks == 1
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.block_table[1] != a.block_table[1]
    for token in (7, 8):  # a decodes until its second block is full and written
        a.append_token(token)
        bm.append_slots(a, len(a))
        bm.cache_blocks(a, len(a))
        a.num_cached_tokens = len(a)
    c = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], 2)
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]


def test_decoding_into_a_shared_block_is_caught():
    bm = BlockManager(num_blocks=10, block_size=4)
    admit(bm, list(range(1, 9)), 0)
    b = make_seq(list(range(1, 10)), 1)
    bm.allocate(b)
    b.num_cached_tokens = 7  # as if position 7, in the shared block 1, were to be written
    with pytest.raises(AssertionError, match="shared or cached block"):
        bm.append_slots(b, 8)


def test_eviction_takes_free_blocks_first_then_the_least_recently_freed():
    bm = BlockManager(num_blocks=4, block_size=2)
    seqs = [admit(bm, [10 * i + 1, 10 * i + 2], i) for i in range(3)]  # one cached block each
    tables = [seq.block_table for seq in seqs]
    for seq in seqs:
        bm.free(seq)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 3
    oldest = seqs[0].block_hashes[0]
    w = admit(bm, [7, 8, 9, 6], 3)  # the never-used block, then the oldest cached one
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 2
    probe = make_seq([1, 2, 3], 4)  # seqs[0]'s tokens: evicted, not found
    assert bm.cached_prefix_blocks(probe) == []
    assert oldest not in [bm._hash_of[b] for b in range(4)]
    assert bm.cached_prefix_blocks(make_seq([11, 12, 3], 5)) == tables[1]
    # The evicted block now holds w's tokens, under w's hash only.
    reused = w.block_table[1]
    assert bm.cached_prefix_blocks(make_seq([7, 8, 9, 6, 5], 6)) == [w.block_table[0], reused]


def test_turned_off_nothing_is_shared():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = admit(bm, list(range(1, 9)), 0)
    b = make_seq(list(range(1, 12)), 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    assert bm.num_cached_blocks == 0


# End to end.

BLOCK = 8
BYTES_PER_BLOCK = BLOCK * 512  # 2 layers x (K, V) x 2 KV heads x 16 x 4 bytes per token
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def make_llm(path: str, enable: bool, num_blocks: int = 256) -> LLM:
    return LLM(path, dtype="float32", device="cpu", block_size=BLOCK,
               cpu_kv_cache_gib=num_blocks * BYTES_PER_BLOCK / 2**30,
               enable_prefix_caching=enable)


def random_ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 380, (n,), generator=gen).tolist()


def run_one_at_a_time(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens of each prompt, run alone in turn, and the tokens each one's prefill fed."""
    stats = llm.engine.stats
    tokens, fed = [], []
    for prompt in prompts:
        before = stats.prefill_tokens
        tokens.append(llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids)
        fed.append(stats.prefill_tokens - before)
    return tokens, fed


def test_a_shared_prefix_is_prefilled_once(tiny_path):
    prefix = random_ids(10 * BLOCK + 3, seed=1)  # ten full blocks and a bit
    prompts = [prefix + random_ids(5, seed=2), prefix + random_ids(9, seed=3)]
    on, off = make_llm(tiny_path, True), make_llm(tiny_path, False)
    on_tokens, on_fed = run_one_at_a_time(on, prompts)
    off_tokens, off_fed = run_one_at_a_time(off, prompts)
    assert on_tokens == off_tokens
    assert off_fed == [len(p) for p in prompts]
    assert on_fed == [len(prompts[0]), len(prompts[1]) - 10 * BLOCK]
    assert on.engine.stats.prefix_cache_hit_tokens == 10 * BLOCK
    assert on.engine.stats.prefix_cache_queried_tokens == sum(map(len, prompts))
    assert off.engine.stats.prefix_cache_hit_tokens == 0


@pytest.mark.parametrize("length", [5 * BLOCK, 5 * BLOCK + 3])
def test_the_same_prompt_twice_hits_all_but_the_last_block(tiny_path, length):
    prompt = random_ids(length, seed=4)
    on, off = make_llm(tiny_path, True), make_llm(tiny_path, False)
    on_tokens, on_fed = run_one_at_a_time(on, [prompt, prompt])
    off_tokens, _ = run_one_at_a_time(off, [prompt])
    assert on_tokens == off_tokens * 2
    # A prompt of whole blocks recomputes its last block; otherwise just its partial block.
    assert on_fed == [length, length % BLOCK or BLOCK]


def test_a_cache_too_small_for_everything_evicts_and_stays_correct(tiny_path):
    prefixes = [random_ids(6 * BLOCK, seed=10 + i) for i in range(3)]
    prompts = [prefixes[i % 3] + random_ids(4, seed=20 + i) for i in range(6)]
    big = make_llm(tiny_path, False)
    expected_alone, _ = run_one_at_a_time(big, prompts)
    expected_batch = [o.token_ids for o in big.generate(prompts, GREEDY, use_tqdm=False)]
    # 20 blocks: a prompt and its output take 8, so by the time a prefix comes back, the blocks
    # of its tail (freed first, so evicted first) have gone to the other prompts; its head hits.
    small = make_llm(tiny_path, True, num_blocks=20)
    assert small.engine.model_runner.num_blocks == 20
    tokens, fed = run_one_at_a_time(small, prompts)
    assert tokens == expected_alone
    assert fed[:3] == [len(p) for p in prompts[:3]]
    assert all(4 < n < len(p) for n, p in zip(fed[3:], prompts[3:]))
    assert [o.token_ids for o in small.generate(prompts, GREEDY, use_tqdm=False)] == \
        expected_batch
    assert small.engine.block_manager.num_free_blocks == 20
