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
                               slot_mapping: torch.Tensor,
                               q_norm_weight: torch.Tensor | None = None,
                               k_norm_weight: torch.Tensor | None = None,
                               norm_eps: float = 1e-6) -> torch.Tensor:
    """With norm weights, each head of query and key RMS-normalised (in float32, no rounding);
    then rotary_embedding, then reshape_and_cache of the rotated key (rounded to the cache's
    dtype) and the value, in place on the caches. Returns the rotated query in float32.
    positions: [T]; query: [T, Hq * D]; key, value: [T, Hkv * D]; caches: [N, S, Hkv, D];
    norm weights: [D]"""
    if q_norm_weight is not None:
        tokens = query.shape[0]
        query = rms_norm(query.reshape(-1, head_size), q_norm_weight, norm_eps).view(tokens, -1)
        key = rms_norm(key.reshape(-1, head_size), k_norm_weight, norm_eps).view(tokens, -1)
    q, k = rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)
    tokens, num_kv_heads = key.shape[0], key.shape[1] // head_size
    reshape_and_cache(k.to(key_cache.dtype).view(tokens, num_kv_heads, head_size),
                      value.view(tokens, num_kv_heads, head_size), key_cache, value_cache,
                      slot_mapping)
    return q


def mla_rotary_and_cache(positions: torch.Tensor, query: torch.Tensor, kv_a: torch.Tensor,
                         kv_norm_weight: torch.Tensor, norm_eps: float, head_size: int,
                         cos_sin_cache: torch.Tensor, is_neox: bool, latent_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> torch.Tensor:
    """The last R dims of each query head rotated (float32, returned), and latent_cache's rows
    at slot_mapping (negative: skipped) set to [rms_norm(kv_a[:, :L]) | rotated kv_a[:, L:]],
    rounded to the cache's dtype.   query: [T, H * D]; kv_a: [T, L + R];
    latent_cache: [N, S, L + R] -> rotated query [T, H * D] float32"""
    tokens, rot = query.shape[0], cos_sin_cache.shape[1]
    latent = kv_a.shape[1] - rot
    heads = query.float().view(tokens, -1, head_size)
    q_pe = heads[..., head_size - rot:].reshape(tokens, -1)
    k_pe = kv_a[:, latent:].float()
    q_pe, k_pe = rotary_embedding(positions, q_pe, k_pe, rot, cos_sin_cache, is_neox)
    q = torch.cat((heads[..., :head_size - rot], q_pe.view(tokens, -1, rot)), -1)
    row = torch.cat((rms_norm(kv_a[:, :latent], kv_norm_weight, norm_eps), k_pe), -1)
    keep = slot_mapping >= 0
    latent_cache.view(-1, latent_cache.shape[-1])[slot_mapping[keep]] = \
        row[keep].to(latent_cache.dtype)
    return q.reshape(tokens, -1)


def attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              cu_seqlens_q: torch.Tensor, seq_lens_k: torch.Tensor, block_tables: torch.Tensor,
              scale: float, sliding_window: int | None = None,
              chunk_size: int | None = None) -> torch.Tensor:
    """Paged causal attention, one sequence at a time with an explicit mask, in float32.
    Query i of a sequence with q_len queries and k_len keys sits at p = k_len - q_len + i and sees
    key j when j <= p, p - j < sliding_window, and j // chunk_size == p // chunk_size.
    query: [T, Hq, D]; key_cache: [N, S, Hkv, D]; value_cache: [N, S, Hkv, Dv];
    cu_seqlens_q: [B + 1]; seq_lens_k: [B]; block_tables: [B, M] -> [T, Hq, Dv] float32"""
    block_size = key_cache.shape[1]
    num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
    out = torch.empty(*query.shape[:2], value_cache.shape[-1], dtype=torch.float32,
                      device=query.device)
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


def mla_attention(query: torch.Tensor, latent_cache: torch.Tensor, latent_size: int,
                  cu_seqlens_q: torch.Tensor, seq_lens_k: torch.Tensor,
                  block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """attention with the latent rows as the one KV head's keys and their first latent_size
    elements as its values, in float32. query: [T, H, L + R]; latent_cache: [N, S, L + R]
    -> [T, H, L] float32"""
    rows = latent_cache.unsqueeze(2)
    return attention(query, rows, rows[..., :latent_size], cu_seqlens_q, seq_lens_k,
                     block_tables, scale)


def moe_route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
              renormalize: bool = False, num_groups: int | None = None,
              topk_groups: int | None = None, group_scoring: str = "max",
              correction_bias: torch.Tensor | None = None,
              scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing in float64: scores = softmax or sigmoid of the logits; selection keys = scores +
    correction_bias; with num_groups, only the experts of the topk_groups groups with the best
    max (or sum of the two best) keys are eligible; the top_k eligible keys, ties to the lower
    index (a stable descending sort); weights = their scores, / their sum when renormalize,
    * scale.   router_logits: [T, E]; correction_bias: [E]
    -> (weights [T, k] float32, ids [T, k] int32)"""
    logits = router_logits.double()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()  # [T, E]
    keys = scores if correction_bias is None else scores + correction_bias.double()
    if num_groups is not None:
        grouped = keys.view(keys.shape[0], num_groups, -1)  # [T, G, E / G]
        if group_scoring == "max":
            group_keys = grouped.amax(-1)
        else:
            group_keys = grouped.topk(2, dim=-1).values.sum(-1)
        kept = group_keys.sort(dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        eligible = torch.zeros_like(group_keys, dtype=torch.bool).scatter_(1, kept, True)
        keys = keys.masked_fill(~eligible.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    ids = keys.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]  # [T, k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return (weights * scale).float(), ids.int()


def moe_align(topk_ids: torch.Tensor, num_experts: int,
              block_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs p = t * k + j sorted by expert (stable), each expert's run padded with T * k to
    a multiple of block_size; expert offsets (padded) and each tile's expert (-1 past the end).
    topk_ids: [T, k] -> (sorted_ids [T * k + E * (block_size - 1)], expert_offsets [E + 1],
    tile_experts [ceil(sorted_ids.numel() / block_size)]), int32"""
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    padded = num_pairs + num_experts * (block_size - 1)
    sorted_ids = torch.full((padded,), num_pairs, dtype=torch.int32)
    tile_experts = torch.full((-(-padded // block_size),), -1, dtype=torch.int32)
    offsets = [0]
    for e in range(num_experts):
        pairs = (flat == e).nonzero().flatten()  # ascending: the stable order
        start = offsets[-1]
        sorted_ids[start:start + pairs.numel()] = pairs.int()
        offsets.append(start + -(-pairs.numel() // block_size) * block_size)
        tile_experts[start // block_size:offsets[-1] // block_size] = e
    return sorted_ids, torch.tensor(offsets, dtype=torch.int32), tile_experts


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, weight_on_input: bool = False) -> torch.Tensor:
    """sum_j w_j * expert_{id_j}(x[t]) (or expert_{id_j}(w_j * x[t]) with weight_on_input),
    expert_e(x) = w2[e] @ (silu(w13[e, :I] @ x) * (w13[e, I:] @ x)), one expert at a time over
    the pairs routed to it, in float32 (float64 when x is float64); pairs with id -1 add nothing.
    x: [T, H]; w13: [E, 2I, H]; w2: [E, H, I]; topk_weights, topk_ids: [T, k] -> [T, H]"""
    dtype = torch.promote_types(x.dtype, torch.float32)
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for e in topk_ids.unique().tolist():
        if e < 0:  # -1: a pair with no expert here, skipped
            continue
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        weight = topk_weights[tokens, slots].to(dtype)[:, None]  # [n, 1]
        h = x[tokens].to(dtype)  # [n, H]
        if weight_on_input:
            h = h * weight
        gate_up = h @ w13[e].to(dtype).T  # [n, 2I]
        y = (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2[e].to(dtype).T
        out.index_add_(0, tokens, y if weight_on_input else y * weight)
    return out
