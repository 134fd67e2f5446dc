"""What a layer's parameter tells the weight loader (fastgen.loader.weights): how to copy a
checkpoint tensor into it, and which pieces a complete checkpoint holds for it.

A parameter may be filled from several checkpoint tensors: the q, k and v projections of a fused
QKV weight (shard ids "q", "k", "v"), the gate and up projections of a fused MLP (0, 1), or one
expert's slice of a fused expert weight (an expert id, with or without a shard id). Each piece is
a ShardKey (shard_id, expert_id); None in a field means "all of them", so a Llama 4 checkpoint
that stores every expert's gate and up projections in one tensor loads the key (None, None) and
covers everything the parameter expects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

ShardId = str | int | None
ShardKey = tuple[ShardId, int | None]  # (shard id, expert id)
WHOLE: ShardKey = (None, None)

# weight_loader(param, loaded_weight, shard_id=None, expert_id=None): copies this rank's part of a
# full checkpoint tensor into param; ValueError (naming the shapes) when it does not fit.
WeightLoader = Callable[..., None]


def weight_parameter(shape: tuple[int, ...], weight_loader: WeightLoader | None = None,
                     shards: Iterable[ShardKey] = (WHOLE,),
                     init: Callable[..., torch.Tensor] = torch.empty) -> nn.Parameter:
    """An inference parameter of this shape (default dtype and device) that loads through
    weight_loader (default: a checked whole-tensor copy) and expects these shards."""
    param = nn.Parameter(init(shape), requires_grad=False)
    set_weight_attrs(param, weight_loader or default_weight_loader, shards)
    return param


def set_weight_attrs(param: nn.Parameter, weight_loader: WeightLoader,
                     shards: Iterable[ShardKey] = (WHOLE,)) -> None:
    param.weight_loader = weight_loader
    param.shards = frozenset(shards)


def check_shape(target: torch.Tensor, loaded: torch.Tensor) -> None:
    if target.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, the layer expects "
                         f"{tuple(target.shape)}")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor,
                          shard_id: ShardId = None, expert_id: int | None = None) -> None:
    """A checked whole-tensor copy, for parameters with no sharding rule (norms)."""
    if shard_id is not None or expert_id is not None:
        raise ValueError(f"this parameter has no shards, got shard {shard_id!r} / expert "
                         f"{expert_id!r}")
    check_shape(param, loaded_weight)
    param.data.copy_(loaded_weight)


def covers(loaded: ShardKey, expected: ShardKey) -> bool:
    """Whether a loaded piece fills an expected one (None loads every shard / every expert)."""
    return all(got is None or got == want for got, want in zip(loaded, expected))
