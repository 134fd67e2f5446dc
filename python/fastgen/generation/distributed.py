"""Processes of a generation job launched by torchrun (one node or several): the TP x DP layout
and the few collectives the job needs.

world_size = tp * dp. Ranks g * tp .. g * tp + tp - 1 form data-parallel group g, one model
replica sharded tp ways (tp = rollout.tensor_model_parallel_size): the group's first rank runs
the engine on the group's rows, the others its workers (fastgen.engine.parallel). Rows are split
into dp contiguous shards, so a shard depends only on the row count and dp. A single process
(no torchrun) with tp > 1 starts its tp - 1 workers itself.

The job's own messages (errors found on rank 0, the finished rows gathered for assembly) always
go over a gloo group on the CPU, with a long timeout: ranks wait there for the slowest shard,
which may take hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastgen import envs
from fastgen.generation.config import ConfigError

# Ranks that finish their shard wait for the slowest one at the final gather.
COLLECTIVE_TIMEOUT = timedelta(days=2)


@dataclass(frozen=True)
class Layout:
    """Where this process sits: its global rank, its DP group and its rank within the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_size: int = 1

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, num_rows: int) -> range:
        """This DP group's contiguous rows: the first num_rows % dp groups get one more."""
        base, extra = divmod(num_rows, self.dp_size)
        start = self.dp_rank * base + min(self.dp_rank, extra)
        return range(start, start + base + (self.dp_rank < extra))


def layout_from_env(tp_size: int) -> Layout:
    """The layout torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) describes; a single
    process without it. ConfigError for a tp size that cannot run."""
    world_size = envs.torchrun_world_size()
    # One process is the job's only rank whatever tp is: its engine starts its workers itself.
    layout = Layout(rank=envs.torchrun_rank(), world_size=world_size,
                    local_rank=envs.torchrun_local_rank(),
                    tp_size=tp_size if world_size > 1 else 1)
    if world_size > 1 and world_size % tp_size:
        raise ConfigError(f"the world size {world_size} is not a multiple of "
                          f"rollout.tensor_model_parallel_size={tp_size}")
    return layout


class Group:
    """The job's collectives over gloo; a no-op stand-in for a single process."""

    def __init__(self, layout: Layout, device_type: str):
        self.layout = layout
        self._group = None
        if layout.world_size == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                import torch

                if layout.local_rank >= torch.cuda.device_count():
                    raise ConfigError(f"local rank {layout.local_rank} has no GPU: this node has "
                                      f"{torch.cuda.device_count()}; use --nproc-per-node "
                                      f"{torch.cuda.device_count()} or fewer")
                torch.cuda.set_device(layout.local_rank)
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        self._group = (dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
                       if dist.get_backend() != "gloo" else dist.group.WORLD)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if self._group is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def gather_all(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order, on every rank."""
        if self._group is None:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.layout.world_size
        dist.all_gather_object(gathered, value, group=self._group)
        return gathered

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's value, in rank order, on rank 0; None elsewhere."""
        if self._group is None:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.layout.world_size if self.layout.is_main else None
        dist.gather_object(value, gathered, dst=0, group=self._group)
        return gathered

    def close(self) -> None:
        if self._group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
