"""The SwiGLU feed-forward block every supported family uses for its dense layers and shared
experts: down(silu(gate(x)) * up(x)), with gate and up fused into one column-parallel matmul and
down row-parallel, so under tensor parallelism the block costs one all-reduce.
Shape letters: T tokens, H hidden, I intermediate."""

from __future__ import annotations

import torch
from torch import nn

from fastgen.distributed import SINGLE_RANK, TensorParallelGroup
from fastgen.layers.activation import SiluAndMul
from fastgen.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)).   gate_up_proj: [2I, H]; down_proj: [H, I]"""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 tp: TensorParallelGroup = SINGLE_RANK, hidden_act: str = "silu",
                 reduce_results: bool = True):
        """reduce_results False: the output is this rank's partial sum (RowParallelLinear's)."""
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"the gated MLP supports hidden_act 'silu', the config has "
                             f"{hidden_act!r}")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias,
                                                       tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, tp,
                                           reduce_results)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]"""
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, H]
