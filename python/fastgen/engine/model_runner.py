"""Runs one scheduled batch through the model: owns the paged KV cache, builds the batch's inputs
and AttentionMetadata, runs the forward pass, and samples each sequence's next token.

The per-step Python cost is kept small on purpose — at batch 1 a decode step of the default model
is ~18 ms on CPU, of which the matmuls take ~12: the step's inputs are gathered in plain lists and
turned into tensors with one torch.tensor call per field, the cache is allocated once, and the
sampled tokens come back to Python in one .tolist(), the step's only wait for the device. On CUDA
a decode batch (one token per sequence) replays a captured CUDA graph instead (cuda_graph.py),
unless config.enforce_eager.

Shape letters: T tokens in the step, B sequences, H hidden size, V vocabulary, M blocks per
sequence (the longest block table in the batch), N cache blocks, S block size, Hkv KV heads,
D head size, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastgen.config import EngineConfig
from fastgen.engine.cuda_graph import DecodeGraphs
from fastgen.engine.sampler import Sampler, TokenHistory, to_device, top_logprobs
from fastgen.engine.scheduler import ScheduledBatch
from fastgen.engine.sequence import Sequence
from fastgen.outputs import Logprobs
from fastgen.layers.attention import AttentionMetadata, KVCache, kv_cache_spec

_GIB = 1 << 30


@dataclass
class StepResult:
    """What a step gave one sequence."""

    token: int | None = None               # the sampled token, when the step reached its end
    logprobs: Logprobs | None = None       # that token's, when asked
    prompt_logprobs: list[Logprobs] | None = None  # for the prompt tokens this chunk predicted


class ModelRunner:
    def __init__(self, model: nn.Module, config: EngineConfig, max_model_len: int,
                 max_blocks_needed: int | None = None):
        """max_blocks_needed caps the cache at what max_num_seqs full-length sequences can use.
        On CUDA the decode graphs are captured here, after the cache is allocated."""
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = config.cache.block_size
        spec = kv_cache_spec(model)  # from the model's layers: per rank under tensor parallelism
        self.num_layers, self.num_kv_heads, self.head_dim = spec.num_layers, spec.num_kv_heads, spec.head_size
        self.num_blocks = self._num_cache_blocks(config, max_blocks_needed)
        self.kv_caches = self._allocate_cache()
        self.sampler = Sampler(self.device, config.seed)
        self.decode_graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, config.max_num_seqs,
                                              max_model_len, self.block_size)

    # The cache: one allocation of [2, L, N, S, Hkv, D], handed to the model as per-layer views.

    def _block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _num_cache_blocks(self, config: EngineConfig, max_blocks_needed: int | None) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # What the engine may still take: its share of the device, less what is in use.
            budget = free - (1 - config.cache.gpu_memory_utilization) * total
        else:
            budget = config.cache.cpu_kv_cache_gib * _GIB
        num_blocks = int(budget // self._block_bytes())
        if max_blocks_needed is not None:
            num_blocks = min(num_blocks, max_blocks_needed)
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache (one block takes "
                             f"{self._block_bytes() / 2**20:.1f} MiB); raise cpu_kv_cache_gib or "
                             f"gpu_memory_utilization")
        return num_blocks

    def _allocate_cache(self) -> list[KVCache]:
        # Attention reads only slots its sequences have written, but the padding rows of a
        # CUDA graph's batch read slot 0 of block 0: zeroed there, so they compute finite values.
        allocate = torch.zeros if self.device.type == "cuda" else torch.empty
        cache = allocate(2, self.num_layers, self.num_blocks, self.block_size,
                         self.num_kv_heads, self.head_dim, dtype=self.dtype, device=self.device)
        return [(cache[0, layer], cache[1, layer]) for layer in range(self.num_layers)]

    # One step.

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[StepResult]:
        """Feeds each sequence's next seq.num_scheduled tokens (a prompt chunk, or its last
        sampled token), writes their keys and values into the cache, and samples a token for
        each sequence the step brings to its end. Returns one StepResult per sequence, in order;
        afterwards the fed tokens count as cached."""
        seqs = batch.seqs
        if self.decode_graphs is not None and self.decode_graphs.accepts(seqs):
            results = [StepResult() for _ in seqs]
            self._sample(self.decode_graphs.run(seqs), seqs, results)
        else:
            results = self._run_eager(seqs)
        for seq in seqs:
            seq.num_cached_tokens += seq.num_scheduled
            seq.num_scheduled = 0
        return results

    def _run_eager(self, seqs: list[Sequence]) -> list[StepResult]:
        input_ids, positions, meta, cu_seqlens = self._prepare(seqs)
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)  # [T, H]

        # The rows whose logits are needed: each sampling sequence's last, then the rows
        # predicting prompt tokens whose logprobs are asked for.
        samplers = [i for i, s in enumerate(seqs)
                    if s.num_cached_tokens + s.num_scheduled == len(s) and s.max_tokens > 0]
        rows = [cu_seqlens[i + 1] - 1 for i in samplers]
        prompt_rows: list[tuple[int, int, int, int]] = []  # (seq, first row, count, position)
        for i, seq in enumerate(seqs):
            if seq.prompt_logprobs is not None:
                # Position p predicts prompt token p + 1; a recomputed prompt is not scored again.
                start = max(seq.num_cached_tokens, len(seq.prompt_logprobs))
                end = min(seq.num_cached_tokens + seq.num_scheduled, seq.num_prompt_tokens - 1)
                if end > start:
                    first = cu_seqlens[i] + start - seq.num_cached_tokens
                    prompt_rows.append((i, len(rows), end - start, start))
                    rows.extend(range(first, first + end - start))
        results = [StepResult() for _ in seqs]
        if rows:
            if len(rows) == hidden.shape[0] and not prompt_rows:
                logits = self.model.compute_logits(hidden)  # decode: one row per sequence
            else:
                logits = self.model.compute_logits(hidden[self._tensor(rows, torch.int64)])
            logits = logits.float()  # [R, V]
            if samplers:
                self._sample(logits[:len(samplers)], [seqs[i] for i in samplers],
                             [results[i] for i in samplers])
            for i, first, count, start in prompt_rows:
                seq = seqs[i]
                targets = seq.token_ids[start + 1: start + 1 + count]
                results[i].prompt_logprobs = top_logprobs(
                    logits[first:first + count], self._tensor(targets, torch.int64),
                    [seq.params.prompt_logprobs] * count)
        return results

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence],
                results: list[StepResult]) -> None:
        params = [s.params for s in seqs]
        histories = ([TokenHistory(s.token_ids, s.num_prompt_tokens) for s in seqs]
                     if any(p.has_penalties for p in params) else None)
        tokens = self.sampler(logits, params, [s.generator for s in seqs], histories)  # [B]
        logprobs = (top_logprobs(logits, tokens, [p.logprobs for p in params])
                    if any(p.logprobs is not None for p in params) else [None] * len(seqs))
        for result, token, entry in zip(results, tokens.tolist(), logprobs):
            result.token = token
            result.logprobs = entry

    def _prepare(self, seqs: list[Sequence]):
        """Each sequence's scheduled tokens, packed back to back.
        -> input_ids [T], positions [T], metadata, cu_seqlens (as a list)"""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens_q = [0]
        seq_lens: list[int] = []
        for seq in seqs:
            start = seq.num_cached_tokens
            end = start + seq.num_scheduled
            table = seq.block_table
            if end - start == 1:  # decode: the common case, kept cheap
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(table[i // bs] * bs + i % bs for i in range(start, end))
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
            seq_lens.append(end)
        max_q = max(s.num_scheduled for s in seqs)
        meta = self._metadata(slots, cu_seqlens_q, seq_lens, seqs, max_q)
        return (self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), meta,
                cu_seqlens_q)

    def _metadata(self, slots: list[int], cu_seqlens_q: list[int], seq_lens: list[int],
                  seqs: list[Sequence], max_seqlen_q: int) -> AttentionMetadata:
        width = max(len(seq.block_table) for seq in seqs)
        # Rows are padded with block 0 past each table's end; attention never reads past
        # ceil(seq_len / S) entries.
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
        return AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),          # [T]
            cu_seqlens_q=self._tensor(cu_seqlens_q, torch.int32),   # [B + 1]
            seq_lens_k=self._tensor(seq_lens, torch.int32),         # [B]
            block_tables=self._tensor(tables, torch.int32),         # [B, M]
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max(seq_lens),
        )

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(data, dtype, self.device)
