"""Rotary embedding: the in-place kernel against the float32 reference in fastgen.ops.reference (on
CPU and CUDA, neox and GPT-J layouts, full and partial rotary dims, contiguous and fused-qkv
strided query / key, every dtype), and the cos/sin table against Hugging Face's rope init
functions for each supported scaling type."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from fastgen import ops
from fastgen.layers.rotary import (RotaryEmbedding, build_cos_sin_cache, rope_inv_freq,
                                   rope_params_from_config)
from fastgen.ops import reference
from fastgen.ops.tolerances import DTYPES, assert_close

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 9, 3, 64
MAX_POSITION = 1000


def make_qkv(num_tokens: int, fused: bool, dtype: torch.dtype, device: str):
    """(qkv or None, query [T, Hq * D], key [T, Hkv * D]); with fused, query and key are column
    slices of one [T, (Hq + 2 Hkv) * D] tensor, as the QKV projection produces them."""
    q_width, kv_width = NUM_HEADS * HEAD_SIZE, NUM_KV_HEADS * HEAD_SIZE
    if not fused:
        return (None, torch.randn(num_tokens, q_width, dtype=dtype, device=device),
                torch.randn(num_tokens, kv_width, dtype=dtype, device=device))
    qkv = torch.randn(num_tokens, q_width + 2 * kv_width, dtype=dtype, device=device)
    return qkv, qkv[:, :q_width], qkv[:, q_width:q_width + kv_width]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 67])
@pytest.mark.parametrize("rotary_dim", [HEAD_SIZE, 32, 20])  # 20: no whole 16-byte vectors (CUDA)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_rotary_embedding(device, dtype, num_tokens, rotary_dim, is_neox, fused):
    cache = build_cos_sin_cache(HEAD_SIZE, rotary_dim, MAX_POSITION, 10000.0, None).to(device)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=device)
    qkv, query, key = make_qkv(num_tokens, fused, dtype, device)
    value_before = None if qkv is None else qkv[:, query.shape[1] + key.shape[1]:].clone()
    expected_q, expected_k = reference.rotary_embedding(positions, query, key, HEAD_SIZE, cache,
                                                        is_neox)
    ops.rotary_embedding(positions, query, key, HEAD_SIZE, cache, is_neox)
    assert_close(query, expected_q, dtype)
    assert_close(key, expected_k, dtype)
    if qkv is not None:  # the value columns of the fused tensor are left alone
        assert torch.equal(qkv[:, query.shape[1] + key.shape[1]:], value_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 67])
@pytest.mark.parametrize("rotary_dim", [HEAD_SIZE, 20])
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_embedding_and_cache(device, dtype, num_tokens, rotary_dim, is_neox):
    """The fused op: query rotated in place; the rotated key (with its unrotated tail) and the
    value land in their slots; slot -1 (padding) writes nothing; key and other slots unchanged."""
    num_blocks, block_size = 9, 16
    cache = build_cos_sin_cache(HEAD_SIZE, rotary_dim, MAX_POSITION, 10000.0, None).to(device)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=device)
    qkv, query, key = make_qkv(num_tokens, True, dtype, device)
    value = qkv[:, query.shape[1] + key.shape[1]:]
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_SIZE)
    key_cache = torch.randn(shape, dtype=dtype, device=device)
    value_cache = torch.randn(shape, dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[1::3] = -1
    key_before = key.clone()
    expected_key_cache, expected_value_cache = key_cache.clone(), value_cache.clone()
    expected_q = reference.rotary_embedding_and_cache(
        positions, query, key, value, HEAD_SIZE, cache, is_neox, expected_key_cache,
        expected_value_cache, slots)
    ops.rotary_embedding_and_cache(positions, query, key, value, HEAD_SIZE, cache, is_neox,
                                   key_cache, value_cache, slots)
    assert_close(query, expected_q, dtype)
    assert_close(key_cache, expected_key_cache, dtype)
    assert torch.equal(value_cache, expected_value_cache)  # copied exactly
    assert torch.equal(key, key_before)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    written[slots[slots >= 0]] = True
    untouched = ~written.view(num_blocks, block_size)
    assert torch.equal(key_cache[untouched], expected_key_cache[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 6, 67])
@pytest.mark.parametrize("head_size,rotary_dim", [(64, 64), (40, 40), (72, 20)])
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_embedding_and_cache_qk_norm(device, dtype, num_tokens, head_size, rotary_dim,
                                            is_neox):
    """With q/k norm weights, every query and key head is RMS-normalised before it is rotated
    (Qwen3, Llama 4): against the float32 reference, and on the CPU bitwise equal to the rms_norm
    op followed by the unnormalised fused op (the norm shares the rms_norm kernel's row code).
    Head sizes 40 and 72 leave a SIMD tail; 72 / 20 a partial rotary dim (the tail is normalised
    too)."""
    num_heads, num_kv_heads, eps = 5, 3, 1e-5
    cache = build_cos_sin_cache(head_size, rotary_dim, MAX_POSITION, 10000.0, None).to(device)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, dtype=dtype,
                      device=device)
    query, key, value = qkv.split([num_heads * head_size, num_kv_heads * head_size,
                                   num_kv_heads * head_size], dim=-1)
    q_weight = (torch.rand(head_size, device=device) + 0.5).to(dtype)
    k_weight = (torch.rand(head_size, device=device) + 0.5).to(dtype)
    shape = (7, 16, num_kv_heads, head_size)
    key_cache = torch.zeros(shape, dtype=dtype, device=device)
    value_cache = torch.zeros(shape, dtype=dtype, device=device)
    slots = torch.randperm(7 * 16, device=device)[:num_tokens]
    slots[2::4] = -1
    key_before, query_before = key.clone(), query.clone()
    expected_key_cache, expected_value_cache = key_cache.clone(), value_cache.clone()
    expected_q = reference.rotary_embedding_and_cache(
        positions, query, key, value, head_size, cache, is_neox, expected_key_cache,
        expected_value_cache, slots, q_weight, k_weight, eps)
    ops.rotary_embedding_and_cache(positions, query, key, value, head_size, cache, is_neox,
                                   key_cache, value_cache, slots, q_weight, k_weight, eps)
    assert_close(query, expected_q, dtype)
    assert_close(key_cache, expected_key_cache, dtype)
    assert torch.equal(value_cache, expected_value_cache)
    assert torch.equal(key, key_before)
    if device == "cpu":
        unfused_q = ops.rms_norm(query_before.reshape(-1, head_size), q_weight, eps)
        unfused_k = ops.rms_norm(key_before.reshape(-1, head_size), k_weight, eps)
        unfused_q, unfused_k = unfused_q.view(num_tokens, -1), unfused_k.view(num_tokens, -1)
        unfused_caches = torch.zeros_like(key_cache), torch.zeros_like(value_cache)
        ops.rotary_embedding_and_cache(positions, unfused_q, unfused_k, value, head_size, cache,
                                       is_neox, *unfused_caches, slots)
        assert torch.equal(query, unfused_q)
        assert torch.equal(key_cache, unfused_caches[0])


def test_rotary_embedding_and_cache_checks():
    cache = build_cos_sin_cache(HEAD_SIZE, HEAD_SIZE, MAX_POSITION, 10000.0, None)
    qkv, query, key = make_qkv(2, True, torch.float32, "cpu")
    value = qkv[:, query.shape[1] + key.shape[1]:]
    caches = [torch.zeros(4, 16, NUM_KV_HEADS, HEAD_SIZE) for _ in range(2)]
    with pytest.raises(RuntimeError, match=r"rotary_embedding_and_cache: slot_mapping\[1\] = 64 is "
                                           r"outside the cache's slots \[0, 64\)"):
        ops.rotary_embedding_and_cache(torch.tensor([0, 1]), query, key, value, HEAD_SIZE, cache,
                                       True, *caches, torch.tensor([0, 64]))
    with pytest.raises(RuntimeError, match=r"rotary_embedding_and_cache: positions\[0\] = 1000"):
        ops.rotary_embedding_and_cache(torch.tensor([MAX_POSITION, 1]), query, key, value,
                                       HEAD_SIZE, cache, True, *caches, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="rotary_embedding_and_cache: value shape"):
        ops.rotary_embedding_and_cache(torch.tensor([0, 1]), query, key, value[:, :64],
                                       HEAD_SIZE, cache, True, *caches, torch.tensor([0, 1]))
    weight = torch.ones(HEAD_SIZE)
    with pytest.raises(RuntimeError, match="q_norm_weight and k_norm_weight are given together"):
        ops.rotary_embedding_and_cache(torch.tensor([0, 1]), query, key, value, HEAD_SIZE, cache,
                                       True, *caches, torch.tensor([0, 1]), weight, None)
    with pytest.raises(RuntimeError, match=r"a q/k norm weight must be \[64\], got \[63\]"):
        ops.rotary_embedding_and_cache(torch.tensor([0, 1]), query, key, value, HEAD_SIZE, cache,
                                       True, *caches, torch.tensor([0, 1]), weight, weight[:63])
    with pytest.raises(RuntimeError, match="norm_weight and query must have the same dtype"):
        ops.rotary_embedding_and_cache(torch.tensor([0, 1]), query, key, value, HEAD_SIZE, cache,
                                       True, *caches, torch.tensor([0, 1]), weight,
                                       weight.to(torch.bfloat16))
    for norm_args in ((), (weight, weight, 1e-5)):
        torch.library.opcheck(torch.ops.fastgen.rotary_embedding_and_cache.default,
                              (torch.tensor([0, 1]), query, key, value, HEAD_SIZE, cache, True,
                               *caches, torch.tensor([3, -1]), *norm_args))


def test_rotary_embedding_layer(device):
    layer = RotaryEmbedding(HEAD_SIZE, HEAD_SIZE, MAX_POSITION, 10000.0, None).to(device)
    assert "cos_sin_cache" not in layer.state_dict()  # rebuilt, never loaded
    positions = torch.randint(0, MAX_POSITION, (5,), device=device)
    _, query, key = make_qkv(5, False, torch.float32, device)
    expected_q, expected_k = reference.rotary_embedding(positions, query, key, HEAD_SIZE,
                                                        layer.cos_sin_cache, True)
    q, k = layer(positions, query, key)
    assert q is query and k is key
    assert_close(q, expected_q)
    assert_close(k, expected_k)


def test_rotary_embedding_opcheck():
    cache = build_cos_sin_cache(HEAD_SIZE, HEAD_SIZE, 16, 10000.0, None)
    _, query, key = make_qkv(3, True, torch.float32, "cpu")
    positions = torch.tensor([0, 15, 7])
    torch.library.opcheck(torch.ops.fastgen.rotary_embedding.default,
                          (positions, query, key, HEAD_SIZE, cache, True))


def test_rotary_embedding_rejects_bad_input():
    cache = build_cos_sin_cache(HEAD_SIZE, HEAD_SIZE, 16, 10000.0, None)
    _, query, key = make_qkv(2, False, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"positions\[1\] = 16 is outside the cos_sin_cache range \[0, 16\)"):
        ops.rotary_embedding(torch.tensor([3, 16]), query, key, HEAD_SIZE, cache, True)
    with pytest.raises(RuntimeError, match="positions must be Long, got Int"):
        ops.rotary_embedding(torch.tensor([3, 4], dtype=torch.int32), query, key, HEAD_SIZE, cache, True)
    with pytest.raises(RuntimeError, match="cos_sin_cache must be Float, got Half"):
        ops.rotary_embedding(torch.tensor([3, 4]), query, key, HEAD_SIZE, cache.half(), True)
    with pytest.raises(RuntimeError, match="head_size 100 must divide query width 576"):
        ops.rotary_embedding(torch.tensor([3, 4]), query, key, 100, cache, True)
    with pytest.raises(RuntimeError, match="unsupported dtype Double"):
        ops.rotary_embedding(torch.tensor([3, 4]), query.double(), key.double(), HEAD_SIZE, cache, True)


# --- the cos/sin table against Hugging Face ------------------------------------------------------

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 256},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 16,
                    "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.707,
                    "original_max_position_embeddings": 256},
    "yarn_attention_factor": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0,
                              "attention_factor": 0.9, "original_max_position_embeddings": 512},
}


def llama_config(rope_parameters: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=4 * HEAD_SIZE, num_attention_heads=4, head_dim=HEAD_SIZE,
                       max_position_embeddings=1024, rope_parameters=dict(rope_parameters))


@pytest.mark.parametrize("name", list(ROPE_PARAMETERS))
def test_rope_matches_hugging_face(name):
    config = llama_config(ROPE_PARAMETERS[name])
    rope_type = config.rope_parameters["rope_type"]
    init = (LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default"
            else ROPE_INIT_FUNCTIONS[rope_type])
    hf_inv_freq, hf_attention_factor = init(config)
    base, scaling = rope_params_from_config(config)
    inv_freq, attention_factor = rope_inv_freq(HEAD_SIZE, config.max_position_embeddings, base, scaling)
    torch.testing.assert_close(inv_freq, hf_inv_freq, atol=0, rtol=0)
    assert attention_factor == pytest.approx(hf_attention_factor, rel=1e-12)

    cache = build_cos_sin_cache(HEAD_SIZE, HEAD_SIZE, config.max_position_embeddings, base, scaling)
    positions = torch.arange(config.max_position_embeddings)[None]  # [1, P]
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.empty(0), positions)  # [1, P, D] each
    assert_close(cache[:, :HEAD_SIZE // 2], hf_cos[0, :, :HEAD_SIZE // 2])
    assert_close(cache[:, HEAD_SIZE // 2:], hf_sin[0, :, :HEAD_SIZE // 2])


def test_rope_params_from_legacy_config():
    legacy = SimpleNamespace(rope_theta=500000.0, max_position_embeddings=4096,
                             rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_params_from_config(legacy) == (500000.0, {"type": "linear", "factor": 2.0})
    assert rope_params_from_config(SimpleNamespace(rope_theta=1e4, rope_scaling=None)) == (1e4, None)
    assert rope_params_from_config(llama_config(ROPE_PARAMETERS["default"])) == (10000.0, None)


def test_rope_rejects_unsupported_scaling():
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        build_cos_sin_cache(HEAD_SIZE, HEAD_SIZE, 16, 1e4, {"rope_type": "dynamic", "factor": 2.0})
