"""Paged causal attention (fastgen.ops.attention) against the float32 reference, on CPU and CUDA.

Every case packs sequences of odd, mixed lengths into one call over a cache whose block tables are
shuffled, and poisons the output with NaN first so an unwritten element fails the comparison."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fastgen import ops
from fastgen.ops import reference
from fastgen.ops.tolerances import DTYPES, assert_close, assert_within_baseline_error


def make_batch(q_lens: list[int], k_lens: list[int], num_heads: int, num_kv_heads: int,
               head_dim: int, block_size: int, dtype: torch.dtype, device: str,
               seed: int = 0) -> dict:
    """Random queries and a paged cache holding k_lens[b] keys for sequence b, its blocks drawn in
    shuffled order from a pool with spare blocks. Returns the op's keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(k / block_size) for k in k_lens]
    max_blocks = max(blocks_per_seq) + 1  # one unused column: the kernel must not need it
    num_blocks = sum(blocks_per_seq) + 3
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(k_lens), max_blocks, dtype=torch.int32)  # [B, M]
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = torch.tensor(pool[:n], dtype=torch.int32)
        pool = pool[n:]
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)  # [N, S, Hkv, D]
    return dict(
        query=torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(device, dtype),
        key_cache=torch.randn(cache_shape, generator=gen).to(device, dtype),
        value_cache=torch.randn(cache_shape, generator=gen).to(device, dtype),
        cu_seqlens_q=torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        .to(device),  # [B + 1]
        seq_lens_k=torch.tensor(k_lens, dtype=torch.int32, device=device),  # [B]
        block_tables=block_tables.to(device),
        max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens), scale=head_dim ** -0.5)


def run_and_compare(batch: dict, sliding_window: int | None = None,
                    chunk_size: int | None = None) -> None:
    out = torch.full_like(batch["query"], float("nan"))  # [T, Hq, D]
    ops.attention(**batch, sliding_window=sliding_window, chunk_size=chunk_size, out=out)
    expected = reference.attention(
        *(batch[k].cpu() for k in ("query", "key_cache", "value_cache", "cu_seqlens_q",
                                   "seq_lens_k", "block_tables")),
        batch["scale"], sliding_window, chunk_size)
    assert_close(out.cpu(), expected, batch["query"].dtype)


# (q_lens, k_lens, sliding_window, chunk_size): sequence b's q_lens[b] queries are the last of
# its k_lens[b] keys.
CASES = {
    "prefill": ([1, 7, 33, 100], [1, 7, 33, 100], None, None),
    "decode": ([1, 1, 1, 1, 1], [1, 15, 17, 50, 129], None, None),
    "chunked_prefill": ([5, 16, 1, 30, 0], [20, 16, 70, 95, 12], None, None),
    "sliding_window": ([100, 40, 1, 3], [100, 90, 60, 5], 17, None),
    "chunk_size": ([70, 20, 1, 6], [70, 50, 45, 6], None, 16),
    "window_and_chunk": ([45, 1, 30], [45, 77, 64], 9, 24),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case: str, dtype: torch.dtype, device: str) -> None:
    q_lens, k_lens, window, chunk = CASES[case]
    batch = make_batch(q_lens, k_lens, num_heads=6, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=dtype, device=device)
    run_and_compare(batch, window, chunk)


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 2), (5, 1)])
def test_head_layouts(num_heads: int, num_kv_heads: int, head_dim: int, device: str) -> None:
    """MHA, GQA 3 and 4, MQA; every head size (the CUDA kernel supports 64, 128, 256)."""
    if device == "cuda" and head_dim == 32:
        pytest.skip("the CUDA kernel is compiled for head sizes 64, 128 and 256")
    batch = make_batch([3, 1, 40], [3, 30, 57], num_heads, num_kv_heads, head_dim, block_size=16,
                       dtype=torch.bfloat16, device=device, seed=1)
    run_and_compare(batch, sliding_window=33)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 20, 24, 33, 40])
def test_head_sizes_off_the_vector_width(head_dim: int, dtype: torch.dtype) -> None:
    """CPU only (CUDA takes 64, 128, 256): head sizes that end in a partial 8- or 16-lane vector,
    through the prefill and decode kernels' tails, with the window and chunk masks."""
    batch = make_batch([3, 1, 40, 1], [3, 30, 57, 300], num_heads=6, num_kv_heads=2,
                       head_dim=head_dim, block_size=16, dtype=dtype, device="cpu", seed=8)
    run_and_compare(batch, sliding_window=33, chunk_size=48)


@pytest.mark.parametrize("block_size", [16, 32, 5])
def test_block_sizes(block_size: int, device: str) -> None:
    batch = make_batch([1, 50, 9], [64, 50, 31], num_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=block_size, dtype=torch.float32, device=device, seed=2)
    run_and_compare(batch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,chunk", [(None, None), (1000, None), (None, 1536)])
def test_long_decode(window: int | None, chunk: int | None, dtype: torch.dtype, device: str) -> None:
    """Long contexts beside short ones: the CPU kernel cuts long sequences' keys into splits
    (flash-decoding) and merges their partial softmax states; windows and chunks move the splits."""
    batch = make_batch([1, 1, 1, 1], [3001, 5, 700, 2100], num_heads=6, num_kv_heads=2,
                       head_dim=64, block_size=16, dtype=dtype, device=device, seed=4)
    run_and_compare(batch, window, chunk)


# Decode batches (one query per sequence) take the CUDA split-KV kernel: GQA groups of every tile
# shape (1, 2, 3 -> 4, 4, 5 -> 8, 8, and 12 = two CTAs per KV head), lengths on both sides of a
# split's minimum (256 keys), a long context cut into many splits, and a sequence with no query.
DECODE_LAYOUTS = [(8, 8), (6, 3), (9, 3), (8, 2), (10, 2), (16, 2), (12, 1)]


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("num_heads,num_kv_heads", DECODE_LAYOUTS)
def test_decode_groups(num_heads: int, num_kv_heads: int, head_dim: int, device: str) -> None:
    batch = make_batch([1, 1, 0, 1, 1, 1], [1, 255, 40, 256, 257, 1100], num_heads, num_kv_heads,
                       head_dim, block_size=16, dtype=torch.bfloat16, device=device, seed=6)
    run_and_compare(batch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,chunk", [(None, None), (4000, None), (None, 8192), (700, 1000)])
def test_decode_long_context(window: int | None, chunk: int | None, dtype: torch.dtype,
                             device: str) -> None:
    """One 20k-token sequence (many splits) beside short ones, Llama-3-8B's head layout."""
    batch = make_batch([1, 1, 1], [20001, 3, 777], num_heads=8, num_kv_heads=2, head_dim=128,
                       block_size=16, dtype=dtype, device=device, seed=7)
    run_and_compare(batch, window, chunk)


def test_decode_upper_bound_max_seqlen_k(device: str) -> None:
    """A CUDA graph captures the decode kernels with max_seqlen_k = the model's context length
    and replays them on shorter sequences: the result must not depend on the bound."""
    batch = make_batch([1, 1, 1, 1], [5, 300, 1, 2049], num_heads=8, num_kv_heads=2, head_dim=64,
                       block_size=16, dtype=torch.bfloat16, device=device, seed=8)
    batch["max_seqlen_k"] = 131072
    run_and_compare(batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_padding_rows_give_zeros() -> None:
    """seq_lens_k = 0 (no visible key) writes zeros on the CUDA decode path, never NaN."""
    batch = make_batch([1, 1], [9, 1], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.bfloat16, device="cuda", seed=9)
    batch["seq_lens_k"][1] = 0
    out = torch.full_like(batch["query"], float("nan"))
    ops.attention(**batch, out=out)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].isfinite().all()


@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(64, 9, 3), (128, 8, 2)])
def test_long_prefill_bf16(head_dim: int, num_heads: int, num_kv_heads: int, device: str) -> None:
    """2048 tokens in bf16: the CPU kernel rounds probabilities to bf16 for P.V, and the error
    must not grow with the context. A length that is no multiple of any tile, beside a chunk."""
    batch = make_batch([2048, 77], [2048, 300], num_heads, num_kv_heads, head_dim, block_size=16,
                       dtype=torch.bfloat16, device=device, seed=5)
    run_and_compare(batch)


# Batches with prefill tokens take the CUDA tensor-core kernel (bf16 / fp16, head sizes 64 and
# 128): 64-query tiles over 64-key tiles, so lengths straddle both, with cached prefixes.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window,chunk", [(None, None), (100, None), (None, 128), (50, 96)])
def test_prefill_tiles(dtype: torch.dtype, head_dim: int, window: int | None, chunk: int | None,
                       device: str) -> None:
    gen = torch.Generator().manual_seed(10)
    q_lens = [1, 63, 64, 65, 129, 200, 7, 1, 300, 64]
    # Some sequences query their whole context, others the end of a cached prefix.
    k_lens = [q + int(torch.randint(0, 150, (1,), generator=gen)) * (i % 2) for i, q in enumerate(q_lens)]
    batch = make_batch(q_lens, k_lens, num_heads=8, num_kv_heads=2, head_dim=head_dim,
                       block_size=16, dtype=dtype, device=device, seed=11)
    run_and_compare(batch, window, chunk)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_error_within_twice_torch(head_dim: int) -> None:
    """Flash-attention's bound: at most twice the error of PyTorch's own bf16 attention against
    the float32 reference, on one long causal sequence."""
    length, heads, kv_heads = 1537, 8, 2
    batch = make_batch([length], [length], heads, kv_heads, head_dim, block_size=16,
                       dtype=torch.bfloat16, device="cuda", seed=12)
    ours = ops.attention(**batch)
    expected = reference.attention(
        *(batch[k].cpu() for k in ("query", "key_cache", "value_cache", "cu_seqlens_q",
                                   "seq_lens_k", "block_tables")), batch["scale"])
    blocks = batch["block_tables"][0, : (length + 15) // 16].long()
    k = batch["key_cache"][blocks].flatten(0, 1)[:length].transpose(0, 1)  # [Hkv, L, D]
    v = batch["value_cache"][blocks].flatten(0, 1)[:length].transpose(0, 1)
    q = batch["query"].transpose(0, 1)  # [Hq, L, D]
    torch_out = torch.nn.functional.scaled_dot_product_attention(
        q[None], k[None], v[None], is_causal=True, scale=batch["scale"], enable_gqa=True)
    assert_within_baseline_error(ours.cpu(), expected, torch_out[0].transpose(0, 1).cpu(),
                                 slack=1e-3)


def test_strided_query(device: str) -> None:
    """query may be the q slice of a fused [T, (Hq + 2 Hkv) * D] projection."""
    batch = make_batch([12, 1], [12, 40], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, device=device, seed=3)
    query = batch["query"]
    tokens, num_heads, head_dim = query.shape
    qkv = torch.randn(tokens, (num_heads + 4) * head_dim, device=device)  # [T, (Hq + 2 Hkv) * D]
    qkv[:, : num_heads * head_dim] = query.flatten(1)
    batch["query"] = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    assert not batch["query"].is_contiguous()
    run_and_compare(batch)


def test_empty_batch(device: str) -> None:
    batch = make_batch([0], [4], num_heads=2, num_kv_heads=1, head_dim=64, block_size=16,
                       dtype=torch.float32, device=device)
    assert ops.attention(**batch).shape == (0, 2, 64)


def _small_batch() -> dict:
    return make_batch([3, 1], [3, 20], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                      dtype=torch.float32, device="cpu")


# Each: (keyword changes to a valid CPU batch, given that batch; a piece of the expected message)
BAD_INPUTS = {
    "int64 metadata": (lambda b: dict(seq_lens_k=b["seq_lens_k"].long()),
                       "seq_lens_k must be Int"),
    "head split": (lambda b: dict(query=torch.randn(4, 3, 64)),
                   "3 query heads do not split into 2 KV heads"),
    "head size": (lambda b: dict(query=torch.randn(4, 4, 32)), "head size"),
    "cache dtype": (lambda b: dict(key_cache=b["key_cache"].half()), "must have the same dtype"),
    "cu_seqlens size": (lambda b: dict(cu_seqlens_q=b["cu_seqlens_q"][:2]),
                        "cu_seqlens_q must be [3]"),
    "cu_seqlens total": (lambda b: dict(cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.int32)),
                         "number of query tokens"),
    "q_len > k_len": (lambda b: dict(seq_lens_k=torch.tensor([2, 20], dtype=torch.int32)),
                      "q_len <= k_len"),
    "block id": (lambda b: dict(block_tables=torch.full_like(b["block_tables"], 1000)),
                 "is not a cache block"),
    "window": (lambda b: dict(sliding_window=0), "sliding_window must be >= 1"),
    "chunk": (lambda b: dict(chunk_size=-4), "chunk_size must be >= 1"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises(name: str) -> None:
    batch = _small_batch()
    changes, message = BAD_INPUTS[name]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ops.attention(**{**batch, **changes(batch)})


def test_opcheck() -> None:
    batch = _small_batch()
    out = torch.empty_like(batch["query"])
    args = (out, batch["query"], batch["key_cache"], batch["value_cache"], batch["cu_seqlens_q"],
            batch["seq_lens_k"], batch["block_tables"], batch["max_seqlen_q"],
            batch["max_seqlen_k"], batch["scale"], 8, None)
    torch.library.opcheck(torch.ops.fastgen.attention.default, args)
