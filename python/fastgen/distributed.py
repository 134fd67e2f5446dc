"""The tensor-parallel group a model's layers run their collectives on.

Layers never call torch.distributed on the default process group: under torchrun with data
parallelism the default group spans every replica, and an all-reduce there would sum the partial
products of different models. Each layer is given the group of the ranks that share its model,
and calls `all_reduce` / `all_gather` on it. With one rank both are no-ops and no process group
exists at all.

Backends, chosen when the group is made (`TensorParallelGroup.create`):
  - CUDA tensors: NCCL through the extension (csrc/cuda/nccl.cu), on the current stream, so the
    decode CUDA graphs capture it;
  - CPU tensors, all ranks on one host: fastgen's shared-memory collectives (csrc/cpu/shm_comm.h):
    a copy, a flag and a float32 sum in rank order, so every rank holds bitwise the same result;
    waits bounded by $FASTGEN_TP_TIMEOUT_S, a peer that exited reported at once.
  - anything else (ranks on several hosts, FASTGEN_CPU_COLLECTIVES=gloo): the torch.distributed
    group's own collectives (gloo on the CPU).
The group's process group (gloo) also carries the engine's control messages.

Shape letters: T tokens, O features, R ranks in the group.
"""

from __future__ import annotations

import pickle
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from fastgen import envs, ops

SHM_BUFFER_BYTES = 8 << 20  # per rank and buffer: larger tensors go through in chunks


@dataclass(frozen=True)
class TensorParallelGroup:
    """rank of size ranks holding one model's shards; process_group is the torch.distributed
    group spanning exactly them (None for a single rank); shm_group the handle of their
    shared-memory collectives (None: use process_group's)."""

    rank: int = 0
    size: int = 1
    process_group: Any = None
    shm_group: int | None = None
    # How MoE layers use the ranks: whole experts placed on each (expert parallelism) instead of
    # every expert's intermediate dimension split (fastgen.layers.moe).
    expert_parallel: bool = False
    nccl_comm: int | None = None  # the NCCL communicator's handle, for CUDA tensors

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside a group of {self.size}")
        if self.size > 1 and self.process_group is None:
            raise ValueError(f"a tensor-parallel group of {self.size} ranks needs its process group")

    @classmethod
    def create(cls, process_group: Any, expert_parallel: bool = False,
               cuda: bool = False) -> TensorParallelGroup:
        """The group of process_group's ranks (collective: every rank calls it), with the
        shared-memory backend when they all run on this host, and with cuda an NCCL
        communicator on each rank's current device."""
        import torch.distributed as dist

        rank, size = dist.get_rank(process_group), dist.get_world_size(process_group)
        src = dist.get_global_rank(process_group, 0)
        nccl_comm = None
        if cuda:
            box = [bytes(ops.nccl_unique_id().tolist()) if rank == 0 else None]
            dist.broadcast_object_list(box, src=src, group=process_group)
            unique_id = torch.frombuffer(bytearray(box[0]), dtype=torch.uint8)
            nccl_comm = ops.nccl_init(unique_id, size, rank)
        if size == 1:
            return cls(rank, size, process_group, expert_parallel=expert_parallel,
                       nccl_comm=nccl_comm)
        hosts: list[Any] = [None] * size
        dist.all_gather_object(hosts, socket.gethostname(), group=process_group)
        shm_group = None
        if envs.cpu_collectives() == "shm" and len(set(hosts)) == 1:
            box = [f"fastgen-tp-{uuid.uuid4().hex[:16]}" if rank == 0 else None]
            dist.broadcast_object_list(box, src=src, group=process_group)
            shm_group = ops.shm_group_init(box[0], size, rank, SHM_BUFFER_BYTES, envs.tp_timeout_s())
        return cls(rank, size, process_group, shm_group, expert_parallel, nccl_comm)

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        """What the collectives of CPU tensors run on: "none" (one rank), "shm" or "gloo"."""
        return "none" if self.size == 1 else "shm" if self.shm_group is not None else "gloo"

    def _uses_shm(self, x: torch.Tensor) -> bool:
        return self.shm_group is not None and x.device.type == "cpu"

    def _uses_nccl(self, x: torch.Tensor) -> bool:
        return self.nccl_comm is not None and x.device.type == "cuda"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the group's ranks, in place; returns x.   x: any shape, contiguous"""
        if self.size == 1:
            return x
        if self._uses_nccl(x):
            ops.nccl_all_reduce(x, self.nccl_comm)
        elif self._uses_shm(x):
            ops.shm_all_reduce(x, self.shm_group)
        else:
            torch.distributed.all_reduce(x, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x, concatenated along dim in rank order.   [.., O, ..] -> [.., R * O, ..]"""
        if self.size == 1:
            return x
        x = x.contiguous()
        if self._uses_shm(x) or self._uses_nccl(x):
            out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            if self._uses_nccl(x):
                ops.nccl_all_gather(out, x, self.nccl_comm)
            else:
                ops.shm_all_gather(out, x, self.shm_group)
            d = dim % x.dim()
            return out.movedim(0, d).flatten(d, d + 1)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x, group=self.process_group)
        return torch.cat(parts, dim=dim)

    def broadcast_object(self, obj: Any = None, patient: bool = False) -> Any:
        """Rank 0's obj on every rank (pickled; through shared memory when the group has it,
        else the process group). patient: the other ranks wait for rank 0 without a time limit
        (a worker waiting for the engine's next step)."""
        if self.size == 1:
            return obj
        if self.shm_group is not None:
            payload = (torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
                       if self.rank == 0 else torch.empty(0, dtype=torch.uint8))
            data = ops.shm_broadcast_bytes(payload, self.shm_group, patient)
            return pickle.loads(data.numpy().tobytes()) if self.rank != 0 else obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.process_group, 0),
                                   group=self.process_group)
        return box[0]

    def barrier(self) -> None:
        """Returns once every rank of the group has called it."""
        if self.size == 1:
            return
        if self.shm_group is not None:
            ops.shm_barrier(self.shm_group)
        else:
            torch.distributed.barrier(group=self.process_group)

    def destroy(self) -> None:
        """Unmaps the shared memory and frees the NCCL communicator (the process group is its
        owner's to destroy)."""
        if self.shm_group is not None:
            ops.shm_group_destroy(self.shm_group)
        if self.nccl_comm is not None:
            ops.nccl_destroy(self.nccl_comm)


SINGLE_RANK = TensorParallelGroup()  # immutable: the group of a model that is not sharded
