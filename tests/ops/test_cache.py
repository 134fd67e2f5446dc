"""reshape_and_cache against the reference in fastgen.ops.reference, on CPU and CUDA: tokens land
in a random permutation of slots, every other slot stays as it was, and key / value may be row
slices of a fused qkv tensor. The op copies, so results must match exactly."""

import pytest
import torch

from fastgen import ops
from fastgen.ops import reference
from fastgen.ops.tolerances import DTYPES

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 9, 3, 64
NUM_BLOCKS, BLOCK_SIZE = 7, 16


def make_kv(num_tokens: int, fused: bool, dtype: torch.dtype, device: str):
    """key, value: [T, Hkv, D]; with fused, column slices of one [T, (Hq + 2 Hkv) * D] tensor."""
    kv_width = NUM_KV_HEADS * HEAD_SIZE
    if not fused:
        return (torch.randn(num_tokens, NUM_KV_HEADS, HEAD_SIZE, dtype=dtype, device=device),
                torch.randn(num_tokens, NUM_KV_HEADS, HEAD_SIZE, dtype=dtype, device=device))
    qkv = torch.randn(num_tokens, NUM_HEADS * HEAD_SIZE + 2 * kv_width, dtype=dtype, device=device)
    key = qkv[:, NUM_HEADS * HEAD_SIZE:-kv_width].unflatten(1, (NUM_KV_HEADS, HEAD_SIZE))
    value = qkv[:, -kv_width:].unflatten(1, (NUM_KV_HEADS, HEAD_SIZE))
    return key, value


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 67])
@pytest.mark.parametrize("fused", [False, True])
def test_reshape_and_cache(device, dtype, num_tokens, fused):
    key, value = make_kv(num_tokens, fused, dtype, device)
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    key_cache = torch.randn(shape, dtype=dtype, device=device)
    value_cache = torch.randn(shape, dtype=dtype, device=device)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, device=device)[:num_tokens]
    expected_key_cache, expected_value_cache = key_cache.clone(), value_cache.clone()
    reference.reshape_and_cache(key, value, expected_key_cache, expected_value_cache, slots)
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    # exact: written slots hold the tokens, untouched slots their old contents
    assert torch.equal(key_cache, expected_key_cache)
    assert torch.equal(value_cache, expected_value_cache)


def test_negative_slots_are_padding(device):
    """A CUDA graph's padded rows carry slot -1: they write nothing."""
    key, value = make_kv(5, True, torch.bfloat16, device)
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    key_cache = torch.randn(shape, dtype=torch.bfloat16, device=device)
    value_cache = torch.randn(shape, dtype=torch.bfloat16, device=device)
    slots = torch.tensor([3, -1, 40, -1, -1], device=device)
    expected_key_cache, expected_value_cache = key_cache.clone(), value_cache.clone()
    expected_key_cache.view(-1, NUM_KV_HEADS, HEAD_SIZE)[[3, 40]] = key[[0, 2]]
    expected_value_cache.view(-1, NUM_KV_HEADS, HEAD_SIZE)[[3, 40]] = value[[0, 2]]
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_key_cache)
    assert torch.equal(value_cache, expected_value_cache)


def test_reshape_and_cache_opcheck():
    key, value = make_kv(3, True, torch.float32, "cpu")
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    torch.library.opcheck(torch.ops.fastgen.reshape_and_cache.default,
                          (key, value, torch.zeros(shape), torch.zeros(shape), torch.tensor([5, 0, 17])))


def test_reshape_and_cache_rejects_bad_input():
    key, value = make_kv(2, False, torch.float32, "cpu")
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    key_cache, value_cache = torch.zeros(shape), torch.zeros(shape)
    num_slots = NUM_BLOCKS * BLOCK_SIZE
    with pytest.raises(RuntimeError, match=rf"slot_mapping\[1\] = {num_slots} is outside the cache's slots"):
        ops.reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([0, num_slots]))
    with pytest.raises(RuntimeError, match="slot_mapping must be Long, got Int"):
        ops.reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="key_cache and key must have the same dtype"):
        ops.reshape_and_cache(key, value, key_cache.half(), value_cache.half(), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"caches must be \[N, S, 3, 64\]"):
        ops.reshape_and_cache(key, value, key_cache[..., :32].contiguous(),
                              value_cache[..., :32].contiguous(), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="unsupported dtype Double"):
        ops.reshape_and_cache(key.double(), value.double(), key_cache.double(), value_cache.double(),
                              torch.tensor([0, 1]))
