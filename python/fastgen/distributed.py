"""The tensor-parallel group a model's layers run their collectives on.

Layers never call torch.distributed on the default process group: under torchrun with data
parallelism the default group spans every replica, and an all-reduce there would sum the partial
products of different models. Each layer is given the group of the ranks that share its model,
and calls `all_reduce` / `all_gather` on it. With one rank (the only layout fastgen runs today)
both are no-ops and no process group exists at all.

Shape letters: T tokens, O features, R ranks in the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallelGroup:
    """rank of size ranks holding one model's shards; process_group is the torch.distributed
    group spanning exactly them (None for a single rank)."""

    rank: int = 0
    size: int = 1
    process_group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside a group of {self.size}")
        if self.size > 1 and self.process_group is None:
            raise ValueError(f"a tensor-parallel group of {self.size} ranks needs its process group")

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the group's ranks, in place; returns x.   x: any shape"""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x, concatenated along dim in rank order.   [.., O, ..] -> [.., R * O, ..]"""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=dim)


SINGLE_RANK = TensorParallelGroup()  # immutable: the group of a model that is not sharded
