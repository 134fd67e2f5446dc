"""Linear layers that own their tensor-parallel sharding rule (as in nano-vllm and vLLM).

A column-parallel layer keeps rank r's slice of the output features; a row-parallel layer keeps
rank r's slice of the input features and sums the partial products across ranks. Each parameter
carries a ``weight_loader(param, loaded_weight, shard_id=None, expert_id=None)`` that copies the
rank's slice of a full checkpoint tensor into it, and the set of shards a complete checkpoint
holds for it (fastgen.layers.parameter), so the shared loader (fastgen.loader.weights) never
repeats the sharding arithmetic. The partial sums of a row-parallel layer are reduced on the
layer's TensorParallelGroup, never the default process group. With one rank (the default) every
layer is a plain matmul over the whole weight.

Every layer (and the LM head) multiplies through ``linear`` below: on the CPU, decode's few tokens
go to fastgen's weight-streaming kernel (torch's small-M bf16 GEMM reads weights at a fraction of
the memory bandwidth); prefill's many tokens, and GPUs, go to F.linear (oneDNN / cuBLAS).

A layer built inside fastgen.quantization.building("gguf" | "int8") holds its weight as a
QuantizedParameter instead: the sharding rule is the same (it slices a GGUF tensor's quantized
rows, or whole blocks of its columns, exactly as it slices a float tensor), only the storage and
the matmul (fastgen.quantization.quantized_linear) differ.

Shape letters: T tokens, I input features, O output features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastgen import envs, ops, quantization
from fastgen.distributed import SINGLE_RANK, TensorParallelGroup
from fastgen.layers.parameter import ShardId, check_shape, set_weight_attrs
from fastgen.quantization import QuantizedParameter, QuantizedTensor, quantized_linear

# Most tokens for which fastgen's CPU linear kernel beats F.linear, per machine (set from
# envs.cpu_linear_max_tokens(), i.e. $FASTGEN_CPU_LINEAR_MAX_TOKENS, when a model loads). Measured on SmolLM2's bf16 shapes with the
# weights coming from memory: on a 2-core AVX512-BF16 EPYC (no AMX) the kernel is 1.3-2.2x faster
# at 1 token and still 1.3-1.9x at 24 and 32; on an AMX Xeon 2x faster at 1-8 tokens but
# 1.15-1.7x slower at 16 and 1.9-2.5x slower at 32, where oneDNN's AMX tiles take over.
CPU_LINEAR_MAX_TOKENS = envs.cpu_linear_max_tokens()


def configure_cpu_thresholds() -> None:
    """Reads the per-machine token thresholds (envs) into the layers; the loader calls it."""
    global CPU_LINEAR_MAX_TOKENS
    CPU_LINEAR_MAX_TOKENS = envs.cpu_linear_max_tokens()
    quantization.configure_cpu_thresholds()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight^T + bias, as out_dtype (default x's dtype).   x: [T, I]; weight: [O, I] -> [T, O]"""
    if weight.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= CPU_LINEAR_MAX_TOKENS:
        return ops.linear(x, weight, bias, out_dtype)
    y = F.linear(x, weight, bias)
    return y if out_dtype is None else y.to(out_dtype)


def weight_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight a parameter holds (a quantized one's logical [O, I])."""
    if isinstance(param, QuantizedParameter):
        return (param.out_features, param.in_features)
    return tuple(param.shape)


def check_fits(param: torch.Tensor, loaded: torch.Tensor | QuantizedTensor) -> None:
    if tuple(loaded.shape) != weight_shape(param):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, the layer expects "
                         f"{weight_shape(param)}")


def store_rows(param: torch.Tensor, rows: torch.Tensor | QuantizedTensor, offset: int = 0) -> None:
    """Checkpoint rows into param at row `offset`: copied into a plain parameter (checked against
    the rows they land on), kept for packing by a quantized one."""
    if isinstance(param, QuantizedParameter):
        param.store(rows, offset)
        return
    if isinstance(rows, QuantizedTensor):
        rows = rows.dequantize()
    target = param.data.narrow(0, offset, min(rows.shape[0], param.shape[0] - offset))
    check_shape(target, rows)
    target.copy_(rows)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) does not split over tensor-parallel size {denominator}")
    return numerator // denominator


def shard_of(loaded: torch.Tensor, dim: int, index: int, size: int, count: int) -> torch.Tensor:
    """Slice index of count equal slices of size along dim; the full tensor must hold exactly
    count * size there, so a checkpoint of the wrong shape is an error, never silently cut."""
    if loaded.dim() <= dim or loaded.shape[dim] != size * count:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                         f"{size * count} along dim {dim}")
    return loaded.narrow(dim, index * size, size)



class LinearBase(nn.Module):
    """y = x W^T (+ b).   weight: [O_local, I_local]; bias: [O_local]"""

    shard_ids: tuple[ShardId, ...] = (None,)  # the checkpoint tensors one weight is made of

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TensorParallelGroup):
        super().__init__()
        self.tp = tp
        self.tp_rank, self.tp_size = tp.rank, tp.size
        shards = [(shard_id, None) for shard_id in self.shard_ids]
        self.quantization = quantization.current_method()
        self.params_dtype = torch.get_default_dtype()
        if self.quantization is None:
            self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        else:
            self.weight = QuantizedParameter(output_size, input_size, self.quantization)
        set_weight_attrs(self.weight, self.weight_loader, shards)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            set_weight_attrs(self.bias, self.weight_loader, shards)
        else:
            self.register_parameter("bias", None)
        self.bias_f32: torch.Tensor | None = None  # a quantized layer's bias, for its kernel

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None, expert_id: int | None = None) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self) -> None:
        if isinstance(self.weight, QuantizedParameter):
            self.weight.finalize(self.params_dtype)
            if self.bias is not None:
                self.bias_f32 = self.bias.float()

    def matmul(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """x W^T (+ b).   x: [T, I_local] -> [T, O_local]"""
        if isinstance(self.weight, QuantizedParameter):
            return quantized_linear(x, self.weight.packed, self.bias_f32 if with_bias else None)
        return linear(x, self.weight, self.bias if with_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, I_local] -> [T, O_local]"""
        return self.matmul(x)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallelGroup = SINGLE_RANK):
        super().__init__(input_size, output_size, bias, tp)

    def weight_loader(self, param, loaded_weight, shard_id=None, expert_id=None):
        check_fits(param, loaded_weight)
        store_rows(param, loaded_weight)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks: rank r keeps rows r*O/tp .. (r+1)*O/tp of W."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallelGroup = SINGLE_RANK):
        super().__init__(input_size, _divide(output_size, tp.size, "output size"), bias, tp)

    def weight_loader(self, param, loaded_weight, shard_id=None, expert_id=None):
        rows = weight_shape(param)[0]
        store_rows(param, shard_of(loaded_weight, 0, self.tp_rank, rows, self.tp_size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul, e.g. an MLP's
    gate and up projections (shards 0 and 1): each rank keeps its slice of every part."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp: TensorParallelGroup = SINGLE_RANK):
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(range(len(output_sizes)))  # part i is shard i: 0 gate, 1 up
        super().__init__(input_size, sum(output_sizes), bias, tp)

    def weight_loader(self, param, loaded_weight, shard_id=None, expert_id=None):
        if shard_id not in self.shard_ids:
            raise ValueError(f"{type(self).__name__} shard must be one of {list(self.shard_ids)}, "
                             f"got {shard_id!r}")
        index = shard_id
        local_sizes = [size // self.tp_size for size in self.output_sizes]
        offset, rows = sum(local_sizes[:index]), local_sizes[index]
        store_rows(param, shard_of(loaded_weight, 0, self.tp_rank, rows, self.tp_size), offset)


class QKVParallelLinear(ColumnParallelLinear):
    """The query, key and value projections fused: output rows are [q | k | v] per rank.
    Heads split over ranks; when there are fewer KV heads than ranks, each KV head is replicated
    on tp_size / Hkv ranks (as in vLLM)."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False,
                 tp: TensorParallelGroup = SINGLE_RANK):
        tp_rank, tp_size = tp.rank, tp.size
        self.head_size = head_size
        self.num_heads = _divide(total_num_heads, tp_size, "query heads")
        if total_num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "KV heads")
            self.kv_shard_rank = tp_rank
        else:
            self.num_kv_heads = 1
            self.kv_shard_rank = tp_rank // _divide(tp_size, total_num_kv_heads, "ranks per KV head")
        self.num_kv_shards = total_num_kv_heads // self.num_kv_heads
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        # Sized per rank already, so skip ColumnParallelLinear's division of the output size.
        LinearBase.__init__(self, hidden_size, self.q_size + 2 * self.kv_size, bias, tp)

    def weight_loader(self, param, loaded_weight, shard_id=None, expert_id=None):
        if shard_id == "q":
            offset, rows, rank, count = 0, self.q_size, self.tp_rank, self.tp_size
        elif shard_id == "k":
            offset, rows, rank, count = self.q_size, self.kv_size, self.kv_shard_rank, self.num_kv_shards
        elif shard_id == "v":
            offset = self.q_size + self.kv_size
            rows, rank, count = self.kv_size, self.kv_shard_rank, self.num_kv_shards
        else:
            raise ValueError(f"QKVParallelLinear shard must be 'q', 'k' or 'v', got {shard_id!r}")
        store_rows(param, shard_of(loaded_weight, 0, rank, rows, count), offset)


class RowParallelLinear(LinearBase):
    """Input features split over ranks: rank r keeps columns r*I/tp .. (r+1)*I/tp of W, and the
    partial products are summed across ranks (the bias is added once, on rank 0). With
    reduce_results False the caller sums them, with other partial sums (an MoE layer's shared
    expert and routed experts in one all-reduce)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallelGroup = SINGLE_RANK, reduce_results: bool = True):
        super().__init__(_divide(input_size, tp.size, "input size"), output_size, bias, tp)
        self.reduce_results = reduce_results

    def weight_loader(self, param, loaded_weight, shard_id=None, expert_id=None):
        if param is self.weight:  # the bias is whole on every rank
            columns = weight_shape(param)[1]
            loaded_weight = shard_of(loaded_weight, 1, self.tp_rank, columns, self.tp_size)
        check_fits(param, loaded_weight)
        store_rows(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, I_local] -> [T, O]"""
        y = self.matmul(x, with_bias=self.tp.is_first_rank)
        return self.tp.all_reduce(y) if self.reduce_results else y
