"""Runs one ModelInput through the model: owns the paged KV cache, turns the input's lists into
tensors and a ForwardBatch, runs the forward pass, and samples the rows that sample. It returns a
ModelOutput and changes nothing outside itself: the scheduler applies the output.

The cache is sized from the model's own description of it: each attention layer's KVCacheSpec
says what a block of it costs, the budget divided by their sum is the number of blocks, and each
layer's cache is allocated from its spec.

The per-step Python cost is kept small on purpose: each field of the input becomes a tensor with
one torch.tensor call, the cache is allocated once, and the sampled tokens come back to Python in
one .tolist(), the step's only wait for the device. A decode input (one token per sequence)
replays a captured graph of the forward pass instead (decode_graphs.py: a CUDA graph, or on the
CPU a step graph), unless config.enforce_eager. The random
streams of seeded sequences live here, by sequence id, until the input says the sequence is gone.

Shape letters: T tokens in the step, B sequences, H hidden size, V vocabulary, R rows whose
logits are needed.
"""

from __future__ import annotations

import torch
from torch import nn

from fastgen.config import EngineConfig
from fastgen.distributed import SINGLE_RANK, TensorParallelGroup
from fastgen.engine.decode_graphs import DecodeGraphs
from fastgen.engine.model_input import ModelInput, ModelOutput, SamplingRows
from fastgen.engine.sampler import Sampler, to_device, top_logprobs
from fastgen.engine.structured_output import TokenMasks
from fastgen.layers.attention import (AttentionMetadata, ForwardBatch, allocate_kv_caches,
                                      kv_cache_specs)
from fastgen.outputs import Logprobs

_GIB = 1 << 30


class ModelRunner:
    def __init__(self, model: nn.Module, config: EngineConfig, max_model_len: int,
                 tp: TensorParallelGroup = SINGLE_RANK):
        """The cache is capped at what max_num_seqs full-length sequences can use; under tensor
        parallelism every rank takes the fewest blocks any rank can hold, so their block tables
        agree. The decode graphs are made here, after the cache is allocated (CUDA's captured at
        once, the CPU's on first use)."""
        self.model = model
        param = next(p for p in model.parameters() if p.is_floating_point())  # not packed blocks
        self.device, self.dtype = param.device, param.dtype
        self.block_size = config.cache.block_size
        self.kv_cache_specs = kv_cache_specs(model, self.dtype)  # per rank under TP
        blocks_per_seq = (max_model_len + self.block_size - 1) // self.block_size
        self.num_blocks = self._num_cache_blocks(config, config.max_num_seqs * blocks_per_seq)
        if tp.size > 1:
            fewest = torch.tensor([self.num_blocks])
            torch.distributed.all_reduce(fewest, torch.distributed.ReduceOp.MIN,
                                         group=tp.process_group)
            self.num_blocks = int(fewest)
        self.kv_caches = allocate_kv_caches(self.kv_cache_specs, self.num_blocks,
                                            self.block_size, self.device)
        self.sampler = Sampler(self.device, config.seed)
        self._generators: dict[int, torch.Generator] = {}  # by sequence id
        self.decode_graphs: DecodeGraphs | None = None
        if not config.enforce_eager:
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, config.max_num_seqs,
                                              max_model_len, self.block_size)

    @property
    def bytes_per_token(self) -> int:
        """KV-cache bytes one token takes, over every layer."""
        return sum(spec.bytes_per_token for spec in self.kv_cache_specs)

    def _block_bytes(self) -> int:
        return sum(spec.page_size_bytes(self.block_size) for spec in self.kv_cache_specs)

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

    # One step.

    @torch.inference_mode()
    def execute(self, model_input: ModelInput, masks: TokenMasks | None = None) -> ModelOutput:
        """Feeds the input's tokens (writing their keys and values into the cache) and samples a
        token for each sampling row. masks: the structured-output masks of the constrained
        sampling rows (being filled while the forward pass runs; waited for after it)."""
        for seq_id in model_input.finished_seq_ids:
            self._generators.pop(seq_id, None)
        sampling = model_input.sampling
        if self.decode_graphs is not None and self.decode_graphs.accepts(model_input):
            tokens, logprobs = self._sample(self.decode_graphs.run(model_input), sampling, masks)
            return ModelOutput(tokens, logprobs, [])
        return self._run_eager(model_input, masks)

    def _run_eager(self, model_input: ModelInput, masks: TokenMasks | None) -> ModelOutput:
        sampling = model_input.sampling
        input_ids = self._tensor(model_input.input_ids, torch.int64)
        positions = self._tensor(model_input.positions, torch.int64)
        hidden = self.model.forward(input_ids, positions, self.forward_batch(model_input))  # [T, H]

        # The rows whose logits are needed: each sampling sequence's last, then the rows
        # predicting prompt tokens whose logprobs are asked for.
        cu_seqlens = model_input.cu_seqlens_q
        rows = [cu_seqlens[b + 1] - 1 for b in sampling.rows]
        prompt_rows = model_input.prompt_logprobs
        firsts = []  # where each prompt row's logits start among `rows`
        for row in prompt_rows:
            b = row.row
            first_fed = model_input.seq_lens[b] - (cu_seqlens[b + 1] - cu_seqlens[b])  # position
            first = cu_seqlens[b] + row.start - first_fed
            firsts.append(len(rows))
            rows.extend(range(first, first + len(row.targets)))
        if not rows:
            return ModelOutput([], [], [])
        if len(rows) == hidden.shape[0] and not prompt_rows:
            logits = self.model.compute_logits(hidden)  # decode: one row per sequence
        else:
            logits = self.model.compute_logits(hidden[self._tensor(rows, torch.int64)])
        logits = logits.float()  # [R, V]
        tokens, logprobs = self._sample(logits[:len(sampling)], sampling, masks)
        scored = [top_logprobs(logits[first:first + len(row.targets)],
                               self._tensor(row.targets, torch.int64),
                               [row.num_logprobs] * len(row.targets))
                  for first, row in zip(firsts, prompt_rows)]
        return ModelOutput(tokens, logprobs, scored)

    def forward_batch(self, model_input: ModelInput) -> ForwardBatch:
        """The input's paged metadata as tensors, with the cache views."""
        tables = model_input.block_tables
        width = max(map(len, tables))
        # Rows are padded with block 0 past each table's end; attention never reads past
        # ceil(seq_len / S) entries.
        padded = [table + [0] * (width - len(table)) for table in tables]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(model_input.slot_mapping, torch.int64),     # [T]
            cu_seqlens_q=self._tensor(model_input.cu_seqlens_q, torch.int32),     # [B + 1]
            seq_lens_k=self._tensor(model_input.seq_lens, torch.int32),           # [B]
            block_tables=self._tensor(padded, torch.int32),                       # [B, M]
            max_seqlen_q=model_input.max_seqlen_q,
            max_seqlen_k=max(model_input.seq_lens),
        )
        return ForwardBatch(meta, self.kv_caches)

    def _sample(self, logits: torch.Tensor, sampling: SamplingRows,
                masks: TokenMasks | None) -> tuple[list[int], list[Logprobs | None]]:
        """logits: [R, V] float32 -> the rows' tokens and (where asked) logprobs, those of the
        raw distribution (before penalties, bias and masks)."""
        params = sampling.params
        generators = [None if seed is None else self._generator(seq_id, seed)
                      for seq_id, seed in zip(sampling.seq_ids, sampling.seeds)]
        tokens = self.sampler(logits, params, generators, sampling.histories, masks,
                              sampling.top_p, sampling.banned)  # [R]
        logprobs = (top_logprobs(logits, tokens, [p.logprobs for p in params])
                    if any(p.logprobs is not None for p in params) else [None] * len(params))
        return tokens.tolist(), logprobs

    def _generator(self, seq_id: int, seed: int) -> torch.Generator:
        """A seeded sequence's own random stream, made on its first draw."""
        generator = self._generators.get(seq_id)
        if generator is None:
            generator = self._generators[seq_id] = self.sampler.make_generator(seed)
        return generator

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(data, dtype, self.device)
