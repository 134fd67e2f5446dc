"""One engine over many processes: tensor parallelism.

Rank 0 of a tensor-parallel group owns the engine: it schedules, samples and detokenizes. Every
step it sends the step's ModelInput (plain lists, cheap to pickle) to the other ranks (through
the group's shared memory on one host, else its gloo process group), then runs its own shard of
the forward pass; the workers run theirs on
the same input, their collectives meeting rank 0's inside the model (fastgen.distributed). All
ranks compute the same logits bit for bit (the shared-memory all-reduce sums in one order), so a
worker's own sampling would agree with rank 0's; it is simply not used.

Processes come from one of two places:
  - `spawn_workers`: rank 0 starts the N - 1 workers itself on this host (LLM(...,
    tensor_parallel_size=N), fastgen-run / fastgen-serve --tensor-parallel-size N), as vLLM's
    multiprocessing executor does;
  - torchrun: every process of the job runs the same command, and ranks other than a group's
    first call `run_worker` (several nodes: fastgen-serve under torchrun --nnodes ...).

A worker that dies makes rank 0's next collective fail with an error naming it (the
shared-memory wait checks the peers' processes; gloo sees the closed connection), which the
engine reports; rank 0 that dies makes the workers' wait for the next input fail, and they exit.

Shape letters: none (no tensors here).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import socket
import sys
from datetime import timedelta
from typing import Any

import torch

from fastgen import envs
from fastgen.distributed import TensorParallelGroup

logger = logging.getLogger(__name__)

# A worker waits this long for rank 0's next step: a server may sit idle for days.
CONTROL_TIMEOUT = timedelta(days=7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, init_method: str | None) -> None:
    """The gloo process group of this job (torchrun's environment when init_method is None)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=init_method, rank=rank,
                                world_size=world_size, timeout=CONTROL_TIMEOUT)


def uses_cuda(config) -> bool:
    return config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())


def select_device(config, local_rank: int) -> None:
    """On CUDA, makes this rank's GPU (local_rank, wrapping around when ranks share GPUs, which
    NCCL allows only from 2.30 with NCCL_MULTI_RANK_GPU_ENABLE=1) the current device."""
    if uses_cuda(config) and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def tensor_parallel_groups(tp_size: int, expert_parallel: bool = False,
                           cuda: bool = False) -> TensorParallelGroup:
    """This process's tensor-parallel group, with the world cut into consecutive groups of
    tp_size ranks (data-parallel replicas); collective over the whole world."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp_size:
        raise ValueError(f"the world size {world} is not a multiple of tensor_parallel_size "
                         f"{tp_size}")
    if world == tp_size:
        return TensorParallelGroup.create(dist.group.WORLD, expert_parallel, cuda)
    mine = None
    for first in range(0, world, tp_size):  # every rank makes every group, in the same order
        group = dist.new_group(list(range(first, first + tp_size)), backend="gloo",
                               timeout=CONTROL_TIMEOUT)
        if first <= rank < first + tp_size:
            mine = group
    return TensorParallelGroup.create(mine, expert_parallel, cuda)


class WorkerLostError(RuntimeError):
    """A tensor-parallel step failed: a rank exited, stalled, or raised. The ranks' state is
    unknown after that (a worker may be inside the step), so the engine cannot go on."""


class Driver:
    """Rank 0's side: sends each step's input to the workers before its own shard runs it."""

    def __init__(self, tp: TensorParallelGroup, workers: list[Any] | None = None):
        self.tp = tp
        self.workers = workers or []  # processes rank 0 started (none under torchrun)
        self._closed = False
        atexit.register(self.close)

    def send(self, message: Any) -> None:
        self.check_workers()
        self.tp.broadcast_object(message)

    def check_workers(self) -> None:
        """RuntimeError naming a worker rank 0 started that has exited."""
        for rank, proc in enumerate(self.workers, start=1):
            if not proc.is_alive():
                raise RuntimeError(f"tensor-parallel worker {rank} (pid {proc.pid}) exited with "
                                   f"code {proc.exitcode}")

    def close(self) -> None:
        """Tells the workers to stop and waits for those rank 0 started."""
        if self._closed:
            return
        self._closed = True
        try:
            if all(proc.is_alive() for proc in self.workers):
                self.send(None)
        except Exception as e:  # noqa: BLE001 - closing: the workers may be gone already
            logger.debug("closing tensor-parallel workers: %s", e)
        for proc in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.tp.destroy()
        if self.workers:  # the process group is ours (spawn_workers), not a torchrun job's
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def run_worker(runner, tp: TensorParallelGroup) -> None:
    """A worker's loop: each input rank 0 sends is run through this rank's shard, until None."""
    while True:
        model_input = tp.broadcast_object(patient=True)
        if model_input is None:
            break
        runner.execute(model_input)
    tp.destroy()


def _worker_main(config, rank: int, world_size: int, init_method: str) -> None:
    """A spawned worker: joins the group, loads its shard, sizes its cache as rank 0 does, and
    runs inputs until told to stop. An error is one line on its stderr and exit code 1 (rank 0,
    loading the same model, usually reports the same error itself; otherwise it sees the worker
    exit)."""
    try:
        _run_spawned_worker(config, rank, world_size, init_method)
    except Exception as e:  # noqa: BLE001 - reported in one line, not a traceback per worker
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"fastgen tensor-parallel worker {rank}: error: {reason}", file=sys.stderr,
              flush=True)
        sys.exit(1)


def _run_spawned_worker(config, rank: int, world_size: int, init_method: str) -> None:
    run_shard(config, _join_spawned(config, rank, world_size, init_method))
    torch.distributed.destroy_process_group()


def _join_spawned(config, rank: int, world_size: int, init_method: str) -> TensorParallelGroup:
    """Rank `rank` of a group rank 0 spawned on this host: its share of the cores (CPU) or its GPU,
    then the group."""
    if not uses_cuda(config):
        torch.set_num_threads(threads_per_rank(world_size))
    select_device(config, rank)
    init_process_group(rank, world_size, init_method)
    return TensorParallelGroup.create(torch.distributed.group.WORLD,
                                      config.parallel.enable_expert_parallel, uses_cuda(config))


def _join_torchrun(config) -> TensorParallelGroup:
    """This torchrun process's tensor-parallel group (its GPU first, on CUDA)."""
    select_device(config, envs.torchrun_local_rank())
    init_process_group(envs.torchrun_rank(), envs.torchrun_world_size(), None)
    return tensor_parallel_groups(config.parallel.tensor_parallel_size,
                                  config.parallel.enable_expert_parallel, uses_cuda(config))


def run_shard(config, tp: TensorParallelGroup) -> None:
    """A worker's life after joining: load its shard, size its cache as rank 0 does, run every
    step rank 0 sends until it stops."""
    from fastgen.engine.model_runner import ModelRunner
    from fastgen.loader import load_model

    loaded = load_model(config, tp)
    run_worker(ModelRunner(loaded.model, config, loaded.max_model_len, tp=tp), tp)


def under_torchrun() -> bool:
    """Whether this process is one of a torchrun job's (which then starts no workers itself)."""
    return envs.torchrun_world_size() > 1


def start_group(config) -> tuple[TensorParallelGroup, list[Any]]:
    """Rank 0's tensor-parallel group for config: under torchrun, the job's group this process
    leads; otherwise a group of workers it starts on this host. Returns it and the workers."""
    if under_torchrun():
        tp = _join_torchrun(config)
        if not tp.is_first_rank:
            raise RuntimeError("only the first rank of a tensor-parallel group runs the engine; "
                               "the others run fastgen.engine.parallel.serve_as_worker")
        return tp, []
    return spawn_workers(config)


def is_torchrun_worker(config) -> bool:
    """For the CLIs that run one engine (fastgen-run, fastgen-serve): whether this process is a
    worker of a torchrun job rather than its rank 0. ValueError when the job's size is not the
    tensor-parallel size (one engine runs on exactly that many processes)."""
    if not under_torchrun():
        return False
    world, tp = envs.torchrun_world_size(), config.parallel.tensor_parallel_size
    if world != tp:
        raise ValueError(f"this torchrun job has {world} processes but --tensor-parallel-size is "
                         f"{tp}: one engine runs on exactly --tensor-parallel-size processes "
                         f"(fastgen-generate runs data-parallel replicas)")
    return envs.torchrun_rank() != 0


def serve_as_worker(config) -> None:
    """A torchrun process that is not its group's first rank: its shard of every step, until rank
    0 stops."""
    run_shard(config, _join_torchrun(config))


def spawn_workers(config) -> tuple[TensorParallelGroup, list[Any]]:
    """Starts ranks 1 .. N - 1 on this host (N = config's tensor_parallel_size) and makes this
    process rank 0 of their group. Returns the group and the worker processes."""
    world = config.parallel.tensor_parallel_size
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_worker_main, args=(config, rank, world, init_method),
                           name=f"fastgen-tp-worker-{rank}", daemon=True)
               for rank in range(1, world)]
    for proc in workers:
        proc.start()
    logger.info("tensor parallelism: started %d worker processes (pids %s)", len(workers),
                ", ".join(str(p.pid) for p in workers))
    return _join_spawned(config, 0, world, init_method), workers


def threads_per_rank(tp_size: int) -> int:
    """The cores of this host shared out between its ranks (at least 1 each)."""
    return max(1, (os.cpu_count() or 1) // tp_size)
