"""Thin Python wrappers over the fastgen kernels (``torch.ops.fastgen.*``, built in csrc/).

Each wrapper allocates the output where the op writes into one and documents shapes; the kernels
check their inputs. Shape letters: T tokens, H hidden, Hq / Hkv query / KV heads, D head size,
N cache blocks, S block size, B sequences, M blocks per sequence, I / O a linear layer's input /
output features.
The pure-PyTorch references the tests compare against are in ``fastgen.ops.reference``.
"""

from __future__ import annotations

import torch

import fastgen._C  # noqa: F401  (registers torch.ops.fastgen)

_ops = torch.ops.fastgen


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x**2) + eps) * weight.   x: [T, H]; weight: [H] -> [T, H]"""
    out = torch.empty_like(x)
    _ops.rms_norm.default(out, x, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    """In place: residual += x; x = rms_norm(residual) * weight.
    x, residual: [T, H]; weight: [H]"""
    _ops.fused_add_rms_norm.default(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:].   x: [T, 2I] -> [T, I]"""
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
    _ops.silu_and_mul.default(out, x)
    return out


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """Rotates query and key in place.   positions: [T] int64; query: [T, Hq * D];
    key: [T, Hkv * D]; cos_sin_cache: [P, R] float32 (cos | sin halves)."""
    _ops.rotary_embedding.default(positions, query, key, head_size, cos_sin_cache, is_neox)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key_cache.view(N * S, Hkv, D)[slot_mapping] = key (and value); negative slots (padding)
    are skipped.   key, value: [T, Hkv, D]; caches: [N, S, Hkv, D]; slot_mapping: [T] int64"""
    _ops.reshape_and_cache.default(key, value, key_cache, value_cache, slot_mapping)


def rotary_embedding_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, head_size: int, cos_sin_cache: torch.Tensor,
                               is_neox: bool, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               slot_mapping: torch.Tensor) -> None:
    """rotary_embedding and reshape_and_cache in one pass: query is rotated in place, and each
    token's rotated key and its value go into its cache slot (negative slots are skipped); key
    itself is left unrotated.   positions: [T] int64; query: [T, Hq * D]; key, value:
    [T, Hkv * D]; cos_sin_cache: [P, R] float32; caches: [N, S, Hkv, D]; slot_mapping: [T] int64"""
    _ops.rotary_embedding_and_cache.default(positions, query, key, value, head_size,
                                            cos_sin_cache, is_neox, key_cache, value_cache,
                                            slot_mapping)


def attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              cu_seqlens_q: torch.Tensor, seq_lens_k: torch.Tensor, block_tables: torch.Tensor,
              max_seqlen_q: int, max_seqlen_k: int, scale: float,
              sliding_window: int | None = None, chunk_size: int | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal paged attention of packed queries (see the schema in csrc/torch_bindings.cpp).
    query: [T, Hq, D]; caches: [N, S, Hkv, D]; cu_seqlens_q: [B + 1] int32; seq_lens_k: [B] int32;
    block_tables: [B, M] int32; out (written when given): [T, Hq, D] -> [T, Hq, D]"""
    if out is None:
        out = torch.empty_like(query)
    _ops.attention.default(out, query, key_cache, value_cache, cu_seqlens_q, seq_lens_k,
                           block_tables, max_seqlen_q, max_seqlen_k, scale, sliding_window,
                           chunk_size)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight^T + bias, accumulated in float32 (CPU only; on GPUs use F.linear).
    x: [T, I]; weight: [O, I]; bias: [O] -> [T, O] of out_dtype (x's dtype, or float32)"""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    _ops.linear.default(out, x, weight, bias)
    return out
