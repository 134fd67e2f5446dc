"""Decode-step graphs: the model's forward pass and logits for a batch of one-token sequences,
captured once per batch-size bucket and replayed, so that a decode step costs one replay instead of
a few hundred operator calls and the Python between them. On CUDA a bucket's graph is a CUDA graph
(one launch); on the CPU it is a step graph (step_graph.py: the same operator calls, made from C++
without Python), captured the first time a batch of that size decodes — the capture is that
step's own forward pass, so it costs nothing at start-up.

A graph replays the calls of its capture with the same buffers and host arguments, so all that
a step changes lives in static buffers sized for the largest bucket, which each step
overwrites in place (one asynchronous copy per field from pinned staging buffers): token ids,
positions, cache slots, key lengths and block tables. A batch of B sequences replays the graph of
the smallest bucket P >= B; rows B..P-1 are padding: token 0 at position 0, written nowhere (slot
PAD_SLOT_ID, which reshape_and_cache skips), attending to one key in block 0. On the CPU every
batch size up to CPU_MAX_CAPTURE_SIZE is its own bucket: a padding row costs the CPU as much as a
real one once a step is compute-bound, more than the Python a replay saves. Only the used width
of the block tables is written: columns past the step's widest table keep earlier steps' entries,
which no sequence's length reaches. The metadata's host ints are the upper bounds, max_seqlen_q 1
and max_seqlen_k max_model_len, which the attention kernels accept for any shorter actual length.
Every CUDA bucket writes its logits into one static [Bmax, V] buffer rather than an output of its
own: the graphs share one memory pool, and none keeps a [P, V] output alive in it. A CPU bucket's
logits are a buffer of its own graph. Either way the logits a run returns are overwritten by the
next run.

Shape letters: Bmax the largest bucket, P a bucket, B the sequences of a step, W the widest block
table among them, M blocks per sequence at max_model_len, V vocabulary.
"""

from __future__ import annotations

import bisect
import logging
import struct
import time

import numpy as np
import torch
from torch import nn

from fastgen.engine import step_graph
from fastgen.engine.model_input import ModelInput
from fastgen.layers.attention import AttentionMetadata, ForwardBatch

logger = logging.getLogger(__name__)

PAD_SLOT_ID = -1  # the cache slot of a padding row: reshape_and_cache skips negative slots
MAX_CAPTURE_SIZE = 256  # larger decode batches run eagerly: launch overhead is small beside them
# The CPU's largest: a step of 32 sequences takes tens of ms there, beside ~2 ms of Python.
CPU_MAX_CAPTURE_SIZE = 32


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes that get a graph, as vLLM picks them: 1, 2, 4, then every 8 up to 64 and
    every 16 above, cut at min(max_num_seqs, 256), which is always the last."""
    largest = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [1, 2, 4, *range(8, 64, 8), *range(64, MAX_CAPTURE_SIZE + 1, 16)]
    return [size for size in sizes if size < largest] + [largest]


def cpu_capture_sizes(max_num_seqs: int) -> list[int]:
    """The CPU's buckets: every batch size from 1 to min(max_num_seqs, 32)."""
    return list(range(1, min(max_num_seqs, CPU_MAX_CAPTURE_SIZE) + 1))


def bucket_for(sizes: list[int], batch_size: int) -> int | None:
    """The smallest of the (ascending) sizes that holds batch_size; None when none does."""
    index = bisect.bisect_left(sizes, batch_size)
    return sizes[index] if index < len(sizes) else None


class DecodeGraphs:
    """The static buffers and, per bucket, a captured graph of forward + logits over them."""

    def __init__(self, model: nn.Module, kv_caches: list, max_num_seqs: int,
                 max_model_len: int, block_size: int, capture: bool = True):
        """kv_caches: the model's cache views (ForwardBatch.kv_caches). capture=False keeps
        everything but the graphs: run() then calls the model eagerly on the same padded static
        buffers (how the tests check the buffers without graphs)."""
        self.model, self.kv_caches = model, kv_caches
        self.device = next(model.parameters()).device
        self.block_size, self.max_model_len = block_size, max_model_len
        on_cpu = self.device.type == "cpu"
        self.sizes = cpu_capture_sizes(max_num_seqs) if on_cpu else capture_sizes(max_num_seqs)
        self.max_batch_size = largest = self.sizes[-1]
        self._bucket_of = [bucket_for(self.sizes, b) for b in range(largest + 1)]
        blocks_per_seq = -(-max_model_len // block_size)
        on_device = {"device": self.device}
        # What the graphs read. cu_seqlens_q never changes: every row has one query.
        self.input_ids = torch.zeros(largest, dtype=torch.int64, **on_device)       # [Bmax]
        self.positions = torch.zeros(largest, dtype=torch.int64, **on_device)       # [Bmax]
        self.slot_mapping = torch.full((largest,), PAD_SLOT_ID, dtype=torch.int64,
                                       **on_device)                                 # [Bmax]
        self.seq_lens_k = torch.ones(largest, dtype=torch.int32, **on_device)       # [Bmax]
        self.cu_seqlens_q = torch.arange(largest + 1, dtype=torch.int32, **on_device)  # [Bmax + 1]
        self.block_tables = torch.zeros(largest, blocks_per_seq, dtype=torch.int32,
                                        **on_device)                                # [Bmax, M]
        # Their staging on the host: pinned on CUDA, so the copies do not block.
        pinned = {"pin_memory": self.device.type == "cuda"}
        self._staging = [_Staging(static, pad, self.sizes, **pinned)
                         for static, pad in ((self.input_ids, 0), (self.positions, 0),
                                             (self.slot_mapping, PAD_SLOT_ID),
                                             (self.seq_lens_k, 1))]
        self._staged_tables = torch.zeros(largest * blocks_per_seq, dtype=torch.int32,
                                          **pinned)  # a step's [P, W] rows, packed
        self._staged_tables_np = self._staged_tables.numpy()
        self._columns = np.arange(blocks_per_seq)  # [M]: which columns a table of a length fills
        # Marks when the last step's copies had read the staging buffers.
        self._copied = torch.cuda.Event() if self.device.type == "cuda" else None
        self._graphs: dict[int, torch.cuda.CUDAGraph | step_graph.StepGraph] = {}
        self.logits: torch.Tensor | None = None  # [Bmax, V] float32: every CUDA graph's output
        self._capture_on_first_run = capture and on_cpu
        if capture and not on_cpu:
            self._capture()

    def accepts(self, model_input: ModelInput) -> bool:
        """Whether run() can take this input: a decode step (ModelInput.is_decode) of no more
        sequences than the largest bucket."""
        return model_input.num_seqs <= self.max_batch_size and model_input.is_decode

    def run(self, model_input: ModelInput) -> torch.Tensor:
        """Feeds each sequence of a decode step (see accepts) its token -> logits [B, V]
        float32; with graphs, a view of the static output that the next run overwrites."""
        batch = model_input.num_seqs
        size = self._bucket_of[batch]
        self._stage(model_input, size)
        graph = self._graphs.get(size)
        if isinstance(graph, step_graph.StepGraph):
            return graph.replay()[0][:batch]
        if graph is not None:
            graph.replay()
            return self.logits[:batch]
        if self._capture_on_first_run:
            return self._capture_step(size)[:batch]
        return self._forward(size)[:batch]

    def _stage(self, model_input: ModelInput, size: int) -> None:
        """Writes the input's rows and the padding rows up to its bucket `size` into the static
        buffers: each field whole from the host, then one non-blocking copy per field."""
        tables = model_input.block_tables
        table_lens = list(map(len, tables))
        width = max(table_lens)
        packed: list[int] = []  # the tables end to end
        for table in tables:
            packed += table
        # struct makes C ints of Python ints about 3x faster than numpy's conversion of a list
        blocks = np.frombuffer(struct.pack(f"={len(packed)}i", *packed), np.int32)

        if self._copied is not None:
            self._copied.synchronize()  # long done: the last step's tokens came back after it
        fields = (model_input.input_ids, model_input.positions, model_input.slot_mapping,
                  model_input.seq_lens)
        for staging, values in zip(self._staging, fields):
            staging.copy(values, size)
        staged = self._staged_tables_np[:size * width].reshape(size, width)  # [P, W]
        staged.fill(0)  # padding rows, and each table's columns past its end: block 0
        in_table = self._columns[:width] < np.array(table_lens)[:, None]  # [B, W]
        staged[:len(tables)][in_table] = blocks  # row by row, as packed
        self.block_tables[:size, :width].copy_(self._staged_tables[:size * width].view(size, width),
                                               non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _forward(self, size: int) -> torch.Tensor:
        """The model on the first `size` rows of the static buffers -> logits [P, V] float32."""
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:size],
                                 cu_seqlens_q=self.cu_seqlens_q[:size + 1],
                                 seq_lens_k=self.seq_lens_k[:size],
                                 block_tables=self.block_tables[:size],
                                 max_seqlen_q=1, max_seqlen_k=self.max_model_len)
        hidden = self.model.forward(self.input_ids[:size], self.positions[:size],
                                    ForwardBatch(meta, self.kv_caches))  # [P, H]
        return self.model.compute_logits(hidden).float()

    def _capture_step(self, size: int) -> torch.Tensor:
        """The CPU's capture: this step's forward pass, recorded as bucket `size`'s step graph
        -> its logits [P, V]. A model whose forward a replay cannot reproduce (it reads tensor
        data in Python) decodes eagerly from then on, with one log line saying why."""
        start = time.perf_counter()
        try:
            graph, (logits,) = step_graph.capture(lambda: self._forward(size))
        except step_graph.CaptureUnsupported as e:
            logger.info("decode steps run eagerly on the CPU: the forward pass cannot be "
                        "captured (%s)", e)
            self._capture_on_first_run = False
            return self._forward(size)  # it rewrites the cache rows the capture wrote
        self._graphs[size] = graph
        logger.debug("captured the decode step of batch size %d as a step graph of %d calls "
                     "in %.1f ms", size, graph.num_nodes, 1e3 * (time.perf_counter() - start))
        return logits

    @torch.inference_mode()
    def _capture(self) -> None:
        """One graph per bucket, largest first, all in one memory pool; each after an eager run
        on the capture stream, so lazy initialisation (cuBLAS workspaces) stays out of it."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for size in reversed(self.sizes):
            with torch.cuda.stream(stream):
                logits = self._forward(size)  # warm-up, on the padding the buffers hold
            if self.logits is None:
                self.logits = torch.empty(self.max_batch_size, logits.shape[-1],
                                          dtype=torch.float32, device=self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.logits[:size].copy_(self._forward(size))
            self._graphs[size] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        logger.info("captured CUDA graphs of the decode step for %d batch sizes (1 to %d) in "
                    "%.1f s", len(self.sizes), self.max_batch_size, time.perf_counter() - start)


class _Staging:
    """The host side of one [Bmax] static buffer: a step's values, then padding up to its bucket."""

    def __init__(self, static: torch.Tensor, pad: int, sizes: list[int], pin_memory: bool):
        self.pad = pad
        self.host = torch.zeros(static.shape, dtype=static.dtype, pin_memory=pin_memory)
        self.host_np = self.host.numpy()  # the same memory, for fast writes from lists
        # per bucket, (static[:P], host[:P]): made once, as slicing costs a step about 1 us each
        self._prefixes = {size: (static[:size], self.host[:size]) for size in sizes}

    def copy(self, values: list[int], size: int) -> None:
        """static[:size] = values, then pad, without blocking the host."""
        self.host_np[:len(values)] = values
        self.host_np[len(values):size] = self.pad
        static, host = self._prefixes[size]
        static.copy_(host, non_blocking=True)
