"""Quantized weights: how a linear layer's weight is created, loaded and multiplied.

A linear layer (fastgen.layers.linear) keeps its tensor-parallel sharding rule whatever its
weight is; only the weight's creation, loading and matmul vary, through a LinearMethod (vLLM's
name for the same seam). Which method the layers of a model get is decided once, by the scope
the loader builds the model in:

    with quantization.building("gguf"):   # or "int8", or None for plain weights
        model = LlamaForCausalLM(config, context)

- None: the weight is an nn.Parameter [O, I] in the model's dtype (today's path).
- "gguf": the weight is filled with a GGUF file's quantized rows (QuantizedTensor) as they are
  stored, shard by shard; after loading, each run of same-type shards is repacked losslessly
  into the kernel layout (formats.pack). Plain float tensors (norms' neighbours, an F16 output
  head) fill it too, and a weight made only of them is a plain weight again.
- "int8": a bf16 / fp16 / fp32 checkpoint's weights quantized at load, weight-only, one scale per
  output channel (stored in the Q8_0 kernel layout).

The matmul (quantized_linear): few tokens stream the packed weight through fastgen's kernel
(ops.quant_linear); many tokens (prefill) dequantize it to the activations' dtype and call
F.linear (oneDNN / cuBLAS), where the GEMM is compute-bound.

Shape letters: T tokens, I input features, O output features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastgen import envs
from fastgen.quantization.formats import (BY_NAME, DENSE_TYPES, FORMATS, TILE_ROWS, BlockFormat,
                                          decode, pack, pack_decoded, quantize_int8_per_channel)

METHODS = ("gguf", "int8")


# ---- what the GGUF reader hands the layers -------------------------------------------------

class QuantizedTensor:
    """A GGUF tensor's quantized rows as the file stores them, seen as the [N, K] weight they
    encode: `narrow` slices rows (any) or columns (whole blocks), so the layers' sharding rules
    apply to it unchanged.   data: uint8 [N, K / block_elems * block_bytes]"""

    def __init__(self, qtype: int, data: torch.Tensor, k: int):
        self.fmt: BlockFormat = FORMATS[qtype]
        self.qtype, self.data, self.k = qtype, data, k

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.k))

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor:
        if dim == 0:
            return QuantizedTensor(self.qtype, self.data.narrow(0, start, length), self.k)
        block = self.fmt.block_elems
        if start % block or length % block:
            raise ValueError(f"a {self.fmt.name} weight splits along its input dim in whole "
                             f"blocks of {block}; columns {start}..{start + length} are not")
        b = self.fmt.block_bytes
        return QuantizedTensor(self.qtype, self.data.narrow(1, start // block * b, length // block * b),
                               length)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]"""
        return decode(self.qtype, self.data.contiguous(), self.k).dequantize()

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.fmt.name}, shape={tuple(self.shape)})"


# ---- a packed weight -----------------------------------------------------------------------

@dataclass
class Segment:
    """Rows [offset, offset + rows) of a weight: packed (one quantized type) or dense."""

    offset: int
    rows: int
    qtype: int | None          # None: dense
    data: torch.Tensor         # packed uint8 [T, nb, chunk], or dense [rows, K]

    @property
    def name(self) -> str:
        return FORMATS[self.qtype].name if self.qtype is not None else str(self.data.dtype)


@dataclass
class PackedWeight:
    """A weight [O, I] in one or more row segments (a fused QKV whose V is Q6_K and Q, K are Q4_K
    has two). Every segment's output is written into its columns of the layer's output."""

    out_features: int
    in_features: int
    segments: list[Segment] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(s.data.numel() * s.data.element_size() for s in self.segments)

    def types(self) -> str:
        return "+".join(sorted({s.name for s in self.segments}))


class QuantizedParameter(nn.Parameter):
    """The weight of a quantized layer: an empty placeholder while loading (shards arrive as
    QuantizedTensor or float rows and are kept as they come), a PackedWeight after
    process_weights_after_loading. Shared between a tied embedding and LM head."""

    def __new__(cls, out_features: int, in_features: int, method: str):
        param = super().__new__(cls, torch.empty(0, dtype=torch.uint8), requires_grad=False)
        param.out_features, param.in_features, param.method = out_features, in_features, method
        param.pending: list[tuple[int, QuantizedTensor | torch.Tensor]] = []
        param.packed: PackedWeight | None = None
        return param

    def __repr__(self) -> str:
        what = self.packed.types() if self.packed else "unloaded"
        return f"QuantizedParameter([{self.out_features}, {self.in_features}], {what})"

    def __reduce_ex__(self, protocol):  # deepcopy / pickling are not supported for these
        raise TypeError("quantized parameters cannot be copied or pickled")

    def store(self, rows: QuantizedTensor | torch.Tensor, offset: int) -> None:
        """Keeps rows [offset, offset + len) of the weight until everything is loaded."""
        n, k = rows.shape
        if k != self.in_features or offset < 0 or offset + n > self.out_features:
            raise ValueError(f"checkpoint rows of shape {tuple(rows.shape)} at row {offset} do not "
                             f"fit a [{self.out_features}, {self.in_features}] weight")
        self.pending.append((offset, rows))

    def finalize(self, dtype: torch.dtype) -> None:
        """Packs what was stored: runs of adjacent same-type quantized rows into one segment
        each; float rows to dtype. For "int8", float rows are quantized per output channel."""
        if self.packed is not None:
            return  # a tied weight, packed through its other module already
        pieces = sorted(self.pending, key=lambda p: p[0])
        self.pending = []
        covered = sum(p[1].shape[0] for p in pieces)
        if covered != self.out_features:
            raise ValueError(f"quantized weight got {covered} of its {self.out_features} rows")
        runs: list[list[tuple[int, QuantizedTensor | torch.Tensor]]] = []
        for offset, rows in pieces:  # adjacent rows of one type (None: float) share a segment
            if runs and _kind(runs[-1][-1][1]) == _kind(rows):
                runs[-1].append((offset, rows))
            else:
                runs.append([(offset, rows)])
        packed = PackedWeight(self.out_features, self.in_features)
        for run in runs:
            offset, first = run[0]
            count = sum(rows.shape[0] for _, rows in run)
            if isinstance(first, QuantizedTensor):
                raw = torch.cat([rows.data.cpu() for _, rows in run]).contiguous()
                data, qtype = pack(first.qtype, raw, self.in_features), first.qtype
            elif self.method == "int8":
                _, decoded = quantize_int8_per_channel(torch.cat([rows.cpu() for _, rows in run]))
                data, qtype = pack_decoded(decoded), 8
            else:
                data, qtype = torch.cat([rows for _, rows in run]).to(dtype).contiguous(), None
            packed.segments.append(Segment(offset, count, qtype, data.to(self.device)))
        self.packed = packed


class QuantizedExperts(QuantizedParameter):
    """A mixture-of-experts layer's E weights of one kind ([E, O, I]: every expert's gate + up,
    or every expert's down), each expert its own QuantizedParameter (`experts[e]`), loaded,
    packed and multiplied on its own (fastgen.layers.moe)."""

    def __new__(cls, num_experts: int, out_features: int, in_features: int, method: str):
        param = super().__new__(cls, out_features, in_features, method)
        param.experts = [QuantizedParameter(out_features, in_features, method)
                         for _ in range(num_experts)]
        param.stacked: torch.Tensor | None = None  # every expert's tiles [E, ...], see finalize
        param.stacked_qtype: int | None = None
        return param

    def __repr__(self) -> str:
        what = self.experts[0].packed.types() if self.experts and self.experts[0].packed else \
            "unloaded"
        return (f"QuantizedExperts({len(self.experts)} x [{self.out_features}, "
                f"{self.in_features}], {what})")

    def finalize(self, dtype: torch.dtype) -> None:
        """Packs each expert; when every expert is one segment of one quantized type (a GGUF
        ffn_*_exps tensor is one type; int8 is Q8_0), their tiles move into one stacked tensor
        [E, tiles, blocks, chunk] (`stacked`, each expert's segment a view of it) for
        ops.quant_fused_moe."""
        for expert in self.experts:
            expert.finalize(dtype)
        segments = [expert.packed.segments for expert in self.experts]
        if not segments or any(len(s) != 1 or s[0].qtype is None for s in segments):
            return
        first = segments[0][0]
        if any(s[0].qtype != first.qtype or s[0].data.shape != first.data.shape for s in segments):
            return
        self.stacked = torch.stack([s[0].data for s in segments])
        self.stacked_qtype = first.qtype
        for e, s in enumerate(segments):
            s[0].data = self.stacked[e]

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """What was stored, dequantized, before finalize: [E, O, I] in dtype."""
        out = torch.empty(len(self.experts), self.out_features, self.in_features, dtype=dtype,
                          device=self.device)
        for e, expert in enumerate(self.experts):
            covered = 0
            for offset, rows in expert.pending:
                values = rows.dequantize() if isinstance(rows, QuantizedTensor) else rows
                out[e].narrow(0, offset, values.shape[0]).copy_(values)
                covered += values.shape[0]
            if covered != self.out_features:
                raise ValueError(f"expert {e}'s weight got {covered} of its {self.out_features} "
                                 f"rows")
            expert.pending = []
        return out


def _kind(rows) -> int | None:
    return rows.qtype if isinstance(rows, QuantizedTensor) else None


# ---- the matmul ----------------------------------------------------------------------------

# Most tokens for which the CPU streams a quantized weight through fastgen's kernel (more
# dequantize it and use oneDNN): envs.quant_max_tokens() ($FASTGEN_QUANT_MAX_TOKENS), read when
# a model loads.
QUANT_MAX_TOKENS = envs.quant_max_tokens()


# On CUDA the dequantize-GEMV (csrc/cuda/quant.cu) serves decode's few tokens; more go to cuBLAS.
CUDA_QUANT_MAX_TOKENS = 8


def configure_cpu_thresholds() -> None:
    global QUANT_MAX_TOKENS
    QUANT_MAX_TOKENS = envs.quant_max_tokens()


def quantized_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ W^T + bias for a packed W, as out_dtype (default x's dtype).
    x: [T, I]; bias: [O] float32 -> [T, O]"""
    from fastgen import ops

    out_dtype = out_dtype or x.dtype
    tokens = x.shape[0]
    out = torch.empty(tokens, weight.out_features, dtype=out_dtype, device=x.device)
    stream = tokens <= (QUANT_MAX_TOKENS if x.device.type == "cpu" else CUDA_QUANT_MAX_TOKENS)
    x = x.contiguous()
    if stream and len(weight.segments) == 1 and weight.segments[0].qtype is not None:
        seg = weight.segments[0]  # decode's common case, with as little Python as it takes
        ops.quant_linear(x, seg.data, seg.qtype, seg.rows, bias, out=out)
        return out
    for seg in weight.segments:
        cols = out.narrow(1, seg.offset, seg.rows)  # rows stay contiguous: the kernels take it
        seg_bias = None if bias is None else bias.narrow(0, seg.offset, seg.rows)
        if seg.qtype is None:
            from fastgen.layers.linear import linear
            cols.copy_(linear(x, seg.data, None if seg_bias is None else seg_bias.to(x.dtype),
                              out_dtype=out_dtype))
        elif stream:
            ops.quant_linear(x, seg.data, seg.qtype, seg.rows, seg_bias, out=cols)
        else:
            w = ops.quant_dequantize(seg.data, seg.qtype, seg.rows, weight.in_features, x.dtype)
            if seg_bias is None and out_dtype == x.dtype and cols.is_contiguous():
                torch.mm(x, w.t(), out=cols)  # the whole output: no copy
                continue
            y = F.linear(x, w)
            if seg_bias is not None:
                y = y.float() + seg_bias
            cols.copy_(y)
    return out


def dequantized_rows(weight: PackedWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ids of W, dequantized (the embedding lookup).   ids: [T] int64 -> [T, I]"""
    from fastgen import ops

    def lookup(seg: Segment, local: torch.Tensor) -> torch.Tensor:
        if seg.qtype is None:
            return F.embedding(local, seg.data).to(dtype)
        return ops.quant_dequantize(seg.data, seg.qtype, seg.rows, weight.in_features, dtype,
                                    rows=local)

    if len(weight.segments) == 1:  # a table is one tensor in every GGUF file seen
        return lookup(weight.segments[0], ids)
    out = torch.empty(ids.shape[0], weight.in_features, dtype=dtype, device=ids.device)
    for seg in weight.segments:
        which = ((ids >= seg.offset) & (ids < seg.offset + seg.rows)).nonzero().squeeze(1)
        out[which] = lookup(seg, ids[which] - seg.offset)
    return out


# ---- the scope models are built in ----------------------------------------------------------

_building: list[str | None] = [None]


@contextlib.contextmanager
def building(method: str | None) -> Iterator[None]:
    """Layers constructed inside take `method` (None, "gguf" or "int8") for their weights."""
    if method not in (None, *METHODS):
        raise ValueError(f"unknown quantization {method!r}; choose one of: {', '.join(METHODS)}")
    _building.append(method)
    try:
        yield
    finally:
        _building.pop()


def current_method() -> str | None:
    return _building[-1]


def describe(model: nn.Module) -> str:
    """One line: how many weights are packed, by type, and their bytes."""
    counts: dict[str, int] = {}
    total = 0
    seen: set[int] = set()
    for param in model.parameters():
        for weight in getattr(param, "experts", [param]):
            if isinstance(weight, QuantizedParameter) and weight.packed and id(weight) not in seen:
                seen.add(id(weight))
                for seg in weight.packed.segments:
                    counts[seg.name] = counts.get(seg.name, 0) + seg.rows * weight.in_features
                total += weight.packed.nbytes
    parts = ", ".join(f"{name} {count / 1e6:.1f}M" for name, count in sorted(counts.items()))
    return f"quantized weights: {parts} ({total / 2**20:.1f} MiB packed)"


__all__ = ["BY_NAME", "DENSE_TYPES", "FORMATS", "METHODS", "TILE_ROWS", "PackedWeight",
           "QuantizedExperts", "QuantizedParameter", "QuantizedTensor", "Segment", "building", "current_method",
           "dequantized_rows", "describe", "quantized_linear"]
