"""DeepSeek MLA's rotary + latent-cache write (mla_rotary_and_cache) against the float32 reference
in fastgen.ops.reference, on CPU and CUDA, every dtype, GPT-J and neox pairs, odd latent and head
sizes (SIMD tails), query rows strided as q_proj's output is not (and as a fused projection's
would be), padding slots; plus its argument checks and opcheck."""

from __future__ import annotations

import pytest
import torch
from fastgen import ops
from fastgen.layers.rotary import build_cos_sin_cache
from fastgen.ops import reference
from fastgen.ops.tolerances import DTYPES, assert_close

MAX_POSITION = 700
YARN = {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}


def make_inputs(tokens, heads, nope, rope, latent, dtype, device, query_pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    head_size = nope + rope
    q_full = torch.randn(tokens, heads * head_size + query_pad, generator=g).to(dtype).to(device)
    query = q_full[:, :heads * head_size]  # rows query_pad wider than the heads: strided
    kv_full = torch.randn(tokens, latent + rope + 5, generator=g).to(dtype).to(device)
    kv_a = kv_full[:, 2:2 + latent + rope]  # a strided column slice
    weight = (torch.rand(latent, generator=g) + 0.5).to(dtype).to(device)
    positions = torch.randint(0, MAX_POSITION, (tokens,), generator=g).to(device)
    return query, kv_a, weight, positions


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 70])
@pytest.mark.parametrize("heads,nope,rope,latent", [(4, 16, 8, 32), (3, 24, 14, 45),
                                                    (16, 128, 64, 512)])
@pytest.mark.parametrize("is_neox", [False, True])
def test_mla_rotary_and_cache(device, dtype, tokens, heads, nope, rope, latent, is_neox):
    head_size = nope + rope
    query, kv_a, weight, positions = make_inputs(tokens, heads, nope, rope, latent, dtype,
                                                 device, query_pad=6)
    cos_sin = build_cos_sin_cache(rope, rope, MAX_POSITION, 10000.0, YARN).to(device)
    num_blocks, block_size = 6, 16
    cache = torch.randn(num_blocks, block_size, latent + rope).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size)[:tokens].to(device)
    slots[1::3] = -1
    expected_cache, kv_a_before = cache.clone(), kv_a.clone()
    expected_q = reference.mla_rotary_and_cache(positions, query, kv_a, weight, 1e-6, head_size,
                                                cos_sin, is_neox, expected_cache, slots)
    ops.mla_rotary_and_cache(positions, query, kv_a, weight, 1e-6, head_size, cos_sin, is_neox,
                             cache, slots)
    assert_close(query, expected_q, dtype)
    assert_close(cache, expected_cache, dtype)
    assert torch.equal(kv_a, kv_a_before)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(cache.view(-1, latent + rope)[untouched],
                       expected_cache.view(-1, latent + rope)[untouched])
    # the nope part of every query head is left exactly as it was
    assert torch.equal(query.view(tokens, heads, head_size)[..., :nope],
                       expected_q.view(tokens, heads, head_size)[..., :nope].to(dtype))


def test_mla_rotary_and_cache_checks():
    query, kv_a, weight, positions = make_inputs(2, 4, 16, 8, 32, torch.float32, "cpu")
    cos_sin = build_cos_sin_cache(8, 8, MAX_POSITION, 10000.0, None)
    cache = torch.zeros(4, 16, 40)
    args = dict(norm_eps=1e-6, head_size=24, cos_sin_cache=cos_sin, is_neox=False)

    def call(**changed):
        kw = dict(positions=positions, query=query, kv_a=kv_a, kv_norm_weight=weight,
                  latent_cache=cache, slot_mapping=torch.tensor([0, 1]), **args)
        kw.update(changed)
        ops.mla_rotary_and_cache(**kw)

    with pytest.raises(RuntimeError, match=r"mla_rotary_and_cache: slot_mapping\[1\] = 64 is "
                                           r"outside the cache's slots \[0, 64\)"):
        call(slot_mapping=torch.tensor([0, 64]))
    with pytest.raises(RuntimeError, match=r"positions\[0\] = 700"):
        call(positions=torch.tensor([MAX_POSITION, 1]))
    with pytest.raises(RuntimeError, match="kv_a width 39 must equal the latent cache row 40"):
        call(kv_a=kv_a[:, :39])
    with pytest.raises(RuntimeError, match=r"kv_norm_weight must be \[32\], got \[31\]"):
        call(kv_norm_weight=weight[:31])
    with pytest.raises(RuntimeError, match="head_size 25 must divide the query width 96"):
        call(head_size=25)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        call(latent_cache=cache.to(torch.bfloat16))
    torch.library.opcheck(torch.ops.fastgen.mla_rotary_and_cache.default,
                          (positions, query, kv_a, weight, 1e-6, 24, cos_sin, False, cache,
                           torch.tensor([3, -1])))


def make_latent_batch(q_lens, k_lens, heads, latent, rope, dtype, device, block_size=16,
                      query_pad=0, seed=0):
    """Random queries [T, H, L + R] (rows query_pad wider when given: strided) and a latent cache
    holding k_lens[b] rows for sequence b in shuffled blocks. Returns mla_attention's arguments."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-k // block_size) for k in k_lens]
    num_blocks = sum(per_seq) + 2
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(k_lens), max(per_seq) + 1, dtype=torch.int32)
    for b, n in enumerate(per_seq):
        tables[b, :n] = torch.tensor(pool[:n], dtype=torch.int32)
        pool = pool[n:]
    width = heads * (latent + rope)
    q_full = torch.randn(sum(q_lens), width + query_pad, generator=g)
    return dict(
        query=q_full.to(dtype).to(device)[:, :width].view(-1, heads, latent + rope),
        latent_cache=torch.randn(num_blocks, block_size, latent + rope, generator=g)
        .to(dtype).to(device),
        latent_size=latent,
        cu_seqlens_q=torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(device),
        seq_lens_k=torch.tensor(k_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device), max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens),
        scale=(latent + rope) ** -0.5)


def check_mla_attention(batch):
    out = torch.full((batch["query"].shape[0], batch["query"].shape[1], batch["latent_size"]),
                     float("nan"), dtype=batch["query"].dtype, device=batch["query"].device)
    ops.mla_attention(**batch, out=out)
    expected = reference.mla_attention(
        *(batch[k].cpu() if isinstance(batch[k], torch.Tensor) else batch[k]
          for k in ("query", "latent_cache", "latent_size", "cu_seqlens_q", "seq_lens_k",
                    "block_tables")), batch["scale"])
    assert_close(out.cpu(), expected, batch["query"].dtype)


# (q_lens, k_lens): decode steps, prefills, a chunk after a cached prefix, and all mixed in one
# call; long contexts take several decode splits (merged).
MLA_CASES = {
    "decode": ([1, 1, 1, 1], [1, 31, 33, 200]),
    "decode_long": ([1, 1], [3000, 1100]),
    "prefill": ([9, 40], [9, 40]),
    "mixed": ([1, 7, 1, 20], [50, 30, 3, 20]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MLA_CASES)
@pytest.mark.parametrize("heads", [16, 5, 2, 1])
def test_mla_attention(device, dtype, case, heads):
    """V2-Lite's rows (512 + 64) with head counts that fill 4-head tiles, leave a remainder, or
    are below one tile (tensor parallelism divides the heads)."""
    q_lens, k_lens = MLA_CASES[case]
    check_mla_attention(make_latent_batch(q_lens, k_lens, heads, 512, 64, dtype, device,
                                          query_pad=64 if heads == 5 else 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("latent,rope", [(32, 32), (48, 16), (40, 24), (33, 7)])
def test_mla_attention_odd_sizes(dtype, latent, rope):
    """Row and value widths off the SIMD widths (the bf16 kernels take multiples of 32 or 16;
    the others every size). CPU only: the CUDA kernels take V2/V3's 576-wide rows."""
    for case in MLA_CASES.values():
        check_mla_attention(make_latent_batch(*case, 3, latent, rope, dtype, "cpu", block_size=5))


def test_mla_attention_checks():
    batch = make_latent_batch([1, 3], [4, 3], 2, 32, 8, torch.float32, "cpu")

    def call(**changed):
        ops.mla_attention(**{**batch, **changed})

    with pytest.raises(RuntimeError, match=r"mla_attention: out's last dim \(the latent size L\) "
                                           r"must be in \[1, 40\)"):
        call(latent_size=40)
    with pytest.raises(RuntimeError, match="mla_attention: key_cache head size 39 != query head "
                                           "size 40"):
        call(latent_cache=batch["latent_cache"][..., :39].contiguous())
    with pytest.raises(RuntimeError, match=r"mla_attention: sequence 0 has 1 queries and 40 keys"):
        call(seq_lens_k=torch.tensor([40, 3], dtype=torch.int32), max_seqlen_k=40)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        call(latent_cache=batch["latent_cache"].to(torch.bfloat16))
    out = torch.empty(4, 2, 32)
    torch.library.opcheck(torch.ops.fastgen.mla_attention.default,
                          (out, batch["query"], batch["latent_cache"], batch["cu_seqlens_q"],
                           batch["seq_lens_k"], batch["block_tables"], 3, 4, 0.1))


def expanded_attention(q, cache_rows, w_uk, w_uv_t, scale, q_len):
    """The textbook form, in float64: each head's keys [W_UK c | k_pe] and values W_UV c rebuilt
    from the cached rows, causal softmax attention.   q: [Tq, H, P + R] (rotated);
    cache_rows: [K, L + R] -> [Tq, H * V]"""
    heads, _, latent = w_uk.shape
    c, k_pe = cache_rows[:, :latent].double(), cache_rows[:, latent:].double()
    keys = torch.cat((torch.einsum("hpl,kl->hkp", w_uk.double(), c),
                      k_pe.expand(heads, *k_pe.shape)), -1)       # [H, K, P + R]
    values = torch.einsum("hlv,kl->hkv", w_uv_t.double(), c)     # [H, K, V]
    scores = torch.einsum("thd,hkd->htk", q.double(), keys) * scale
    k_len = cache_rows.shape[0]
    visible = torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("htk,hkv->thv", scores.softmax(-1), values)
    return out.reshape(q.shape[0], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorbed_latent_attention_equals_expanded(device, dtype):
    """LatentAttention (W_UK absorbed into the query, multi-query attention over the latent rows,
    W_UV after) against per-head K / V rebuilt from the same cache and ordinary attention: a
    prefill, a chunk after a cached prefix, and decode steps, in one packed batch, V2-Lite's head
    shapes at reduced heads."""
    from fastgen.layers.attention import AttentionMetadata, ForwardBatch
    from fastgen.layers.mla import LatentAttention
    from fastgen.layers.rotary import RotaryEmbedding

    heads, nope, rope, v_dim, latent, block = 4, 128, 64, 128, 512, 16
    scale = 0.114721
    rotary = RotaryEmbedding(rope, rope, MAX_POSITION, 10000.0, YARN, is_neox=False).to(device)
    layer = LatentAttention(heads, nope, rope, v_dim, latent, scale, 0, rotary)
    g = torch.Generator().manual_seed(3)
    w_uk = (torch.randn(heads, nope, latent, generator=g) / latent ** 0.5).to(dtype).to(device)
    w_uv_t = (torch.randn(heads, latent, v_dim, generator=g) / latent ** 0.5).to(dtype).to(device)
    norm_w = (torch.rand(latent, generator=g) + 0.5).to(dtype).to(device)
    q_lens, k_lens = [7, 5, 1, 1], [7, 23, 40, 2]
    num_blocks = sum(-(-k // block) for k in k_lens) + 1
    cache = torch.zeros(num_blocks, block, latent + rope, dtype=dtype, device=device)
    tables, next_block = [], 1
    for k in k_lens:
        n = -(-k // block)
        tables.append(list(range(next_block, next_block + n)) + [0] * (4 - n))
        next_block += n
    block_tables = torch.tensor(tables, dtype=torch.int32, device=device)

    def slots(b, positions):
        return [tables[b][p // block] * block + p % block for p in positions]

    # The cached prefixes (k_len - q_len tokens) written first, as earlier steps would have.
    prefix_pos = [list(range(k - q)) for q, k in zip(q_lens, k_lens)]
    flat_prefix = [p for ps in prefix_pos for p in ps]
    if flat_prefix:
        _, kv_a, _, _ = make_inputs(len(flat_prefix), heads, nope, rope, latent, dtype, device,
                                    seed=4)
        dummy_q = torch.zeros(len(flat_prefix), heads * (nope + rope), dtype=dtype, device=device)
        prefix_slots = [s for b, ps in enumerate(prefix_pos) for s in slots(b, ps)]
        ops.mla_rotary_and_cache(torch.tensor(flat_prefix, device=device), dummy_q, kv_a, norm_w,
                                 1e-6, nope + rope, rotary.cos_sin_cache, False, cache,
                                 torch.tensor(prefix_slots, device=device))
    new_pos = [list(range(k - q, k)) for q, k in zip(q_lens, k_lens)]
    positions = torch.tensor([p for ps in new_pos for p in ps], device=device)
    tokens = positions.numel()
    q, kv_a, _, _ = make_inputs(tokens, heads, nope, rope, latent, dtype, device, seed=5)
    q = q.contiguous()
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([s for b, ps in enumerate(new_pos) for s in slots(b, ps)],
                                  device=device),
        cu_seqlens_q=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()],
                                  dtype=torch.int32, device=device),
        seq_lens_k=torch.tensor(k_lens, dtype=torch.int32, device=device),
        block_tables=block_tables, max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens))
    q_rotated = q.clone()
    out = layer(q_rotated, kv_a, norm_w, 1e-6, w_uk, w_uv_t, positions, ForwardBatch(meta, [cache]))
    start = 0
    for b, (q_len, k_len) in enumerate(zip(q_lens, k_lens)):
        rows = cache.view(-1, latent + rope)[slots(b, range(k_len))]
        expected = expanded_attention(q_rotated[start:start + q_len].view(q_len, heads, -1), rows,
                                      w_uk, w_uv_t, scale, q_len)
        assert_close(out[start:start + q_len], expected, dtype)
        start += q_len
