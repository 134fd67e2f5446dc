"""Drives a fastgen model the way the engine does, without the engine: a paged KV cache and the
AttentionMetadata for a packed prefill of several prompts and for batched decode steps.

Each sequence owns a fixed run of cache blocks, handed out in a shuffled order so that the block
table's indirection is exercised. Shape letters: T tokens, B sequences, V vocabulary, N cache
blocks, S block size, M blocks per sequence, Hkv KV heads, D head size.
"""

from __future__ import annotations

import torch

from fastgen.layers.attention import (AttentionMetadata, ForwardBatch, allocate_kv_caches,
                                      kv_cache_specs)


class PagedHarness:
    """Runs prefill and decode for up to max_seqs sequences of up to max_len tokens."""

    def __init__(self, model, max_seqs: int, max_len: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
        self.model, self.block_size, self.device = model, block_size, device
        blocks_per_seq = (max_len + block_size - 1) // block_size
        num_blocks = max_seqs * blocks_per_seq
        # each layer's cache as its spec says: [N, S, Hkv, D] keys and values for Llama
        self.kv_caches = allocate_kv_caches(kv_cache_specs(model, dtype), num_blocks, block_size,
                                            torch.device(device))
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.block_tables = order.view(max_seqs, blocks_per_seq).to(torch.int32)  # [B, M]
        self.seq_lens: list[int] = []

    def _slot(self, seq: int, position: int) -> int:
        block = int(self.block_tables[seq, position // self.block_size])
        return block * self.block_size + position % self.block_size

    def _run(self, tokens: list[int], positions: list[int], seqs: list[int],
             q_lens: list[int]) -> torch.Tensor:
        """One forward over the packed tokens -> logits [T, V] float32."""
        cu_seqlens = [0]
        for q_len in q_lens:
            cu_seqlens.append(cu_seqlens[-1] + q_len)
        k_lens = [self.seq_lens[s] for s in seqs]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([self._slot(s, p) for s, q_len, k_len in zip(seqs, q_lens, k_lens)
                                       for p in range(k_len - q_len, k_len)], device=self.device),
            cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=self.device),
            seq_lens_k=torch.tensor(k_lens, dtype=torch.int32, device=self.device),
            block_tables=self.block_tables[seqs].to(self.device),
            max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens))
        with torch.no_grad():
            hidden = self.model(torch.tensor(tokens, device=self.device),
                                torch.tensor(positions, device=self.device),
                                ForwardBatch(meta, self.kv_caches))  # [T, H]
            return self.model.compute_logits(hidden)  # [T, V]

    def prefill(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Starts one sequence per prompt, all in one packed forward -> per prompt [L_b, V]."""
        self.seq_lens = [len(p) for p in prompts]
        logits = self._run([t for p in prompts for t in p],
                           [i for p in prompts for i in range(len(p))],
                           list(range(len(prompts))), self.seq_lens)
        return list(logits.split(self.seq_lens))

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Appends one token to every sequence, in one batched forward -> [B, V]."""
        positions = list(self.seq_lens)
        self.seq_lens = [n + 1 for n in self.seq_lens]
        return self._run(tokens, positions, list(range(len(tokens))), [1] * len(tokens))
