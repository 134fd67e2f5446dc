"""Pure-PyTorch references for every fastgen op: the formulas, written for clarity, computed in
float32 (or the dtype of the inputs passed). Kernel tests compare against these; they are never
used on the serving path."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x**2) + eps) * weight, in float32.   x: [T, H]; weight: [H]"""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is rounded to x.dtype first, as
    the kernel stores it.   x, residual: [T, H]; weight: [H]"""
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(summed, weight, eps), summed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias, in float32.   x: [T, I]; weight: [O, I]; bias: [O] -> [T, O]"""
    y = x.float() @ weight.float().T
    return y if bias is None else y + bias.float()


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:], in float32.   x: [T, 2I] -> [T, I]"""
    gate, up = x.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     head_size: int, cos_sin_cache: torch.Tensor,
                     is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns rotated (query, key) in float32.   positions: [T]; query: [T, Hq * D];
    key: [T, Hkv * D]; cos_sin_cache: [P, R] with cos | sin halves. Rotate-half (neox) pairs
    dim i with i + R/2; GPT-J pairs 2i with 2i + 1. Dims >= R pass through."""
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, R/2] each

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.float().reshape(x.shape[0], -1, head_size)  # [T, heads, D]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        c, s = cos[:, None, :], sin[:, None, :]
        if is_neox:
            x1, x2 = x_rot.chunk(2, dim=-1)
            rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        else:
            x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
            rotated = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        return torch.cat((rotated, x_pass), dim=-1).flatten(1)

    return rotate(query), rotate(key)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key_cache.view(N * S, Hkv, D)[slot_mapping] = key; the same for value (in place). Tokens
    with a negative slot (padding) are skipped.
    key, value: [T, Hkv, D]; caches: [N, S, Hkv, D]; slot_mapping: [T] int64"""
    num_blocks, block_size = key_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache.view(num_blocks * block_size, *key_cache.shape[2:])[slots] = key[keep]
    value_cache.view(num_blocks * block_size, *value_cache.shape[2:])[slots] = value[keep]


def rotary_embedding_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, head_size: int, cos_sin_cache: torch.Tensor,
                               is_neox: bool, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               slot_mapping: torch.Tensor) -> torch.Tensor:
    """rotary_embedding, then reshape_and_cache of the rotated key (rounded to the cache's dtype)
    and the value, in place on the caches. Returns the rotated query in float32.
    positions: [T]; query: [T, Hq * D]; key, value: [T, Hkv * D]; caches: [N, S, Hkv, D]"""
    q, k = rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)
    tokens, num_kv_heads = key.shape[0], key.shape[1] // head_size
    reshape_and_cache(k.to(key_cache.dtype).view(tokens, num_kv_heads, head_size),
                      value.view(tokens, num_kv_heads, head_size), key_cache, value_cache,
                      slot_mapping)
    return q


def attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              cu_seqlens_q: torch.Tensor, seq_lens_k: torch.Tensor, block_tables: torch.Tensor,
              scale: float, sliding_window: int | None = None,
              chunk_size: int | None = None) -> torch.Tensor:
    """Paged causal attention, one sequence at a time with an explicit mask, in float32.
    Query i of a sequence with q_len queries and k_len keys sits at p = k_len - q_len + i and sees
    key j when j <= p, p - j < sliding_window, and j // chunk_size == p // chunk_size.
    query: [T, Hq, D]; caches: [N, S, Hkv, D]; cu_seqlens_q: [B + 1]; seq_lens_k: [B];
    block_tables: [B, M] -> [T, Hq, D] float32"""
    block_size = key_cache.shape[1]
    num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    for b in range(seq_lens_k.numel()):
        q_start, q_end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k_len, q_len = int(seq_lens_k[b]), q_end - q_start
        if q_len == 0:
            continue
        blocks = block_tables[b, : (k_len + block_size - 1) // block_size].long()
        k = key_cache[blocks].flatten(0, 1)[:k_len].float()  # [k_len, Hkv, D]
        v = value_cache[blocks].flatten(0, 1)[:k_len].float()
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [k_len, Hq, D]
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        q = query[q_start:q_end].float()  # [q_len, Hq, D]
        pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]  # [q_len, 1]
        key_pos = torch.arange(k_len, device=query.device)[None, :]  # [1, k_len]
        allowed = key_pos <= pos
        if sliding_window is not None:
            allowed &= pos - key_pos < sliding_window
        if chunk_size is not None:
            allowed &= key_pos // chunk_size == pos // chunk_size
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out
