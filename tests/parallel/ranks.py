"""Runs a function on N spawned processes joined by a gloo process group: the harness of the
tensor-parallel tests (CPU, one host).

    outcomes = run_ranks(fn, 2, arg)   # fn(rank, world_size, arg) on each rank
    assert all(o.ok for o in outcomes), outcomes

fn must be importable (a module-level function); what it returns must pickle.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastgen.engine.parallel import free_port


@dataclass
class Outcome:
    rank: int
    ok: bool
    value: Any = None    # fn's result
    error: str = ""      # the traceback, or how the process ended

    def __repr__(self) -> str:
        return f"rank {self.rank}: " + (f"ok {self.value!r}" if self.ok else self.error)


def _rank_main(fn, rank, world_size, port, results, args, env):
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        results.put((rank, True, fn(rank, world_size, *args), ""))
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put((rank, False, None, traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, env: dict[str, str] | None = None,
              timeout: float = 120.0) -> list[Outcome]:
    """fn(rank, world_size, *args) on world_size processes; each rank's outcome, in rank order.
    A rank that ends without reporting (it exited) or is still running at the timeout is an
    outcome with ok False; the processes are gone when this returns."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(fn, rank, world_size, port, results, args, env or {}))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, Outcome] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, value, error = results.get(timeout=0.2)
            outcomes[rank] = Outcome(rank, ok, value, error)
        except queue_module.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for rank, p in enumerate(procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()) if rank in outcomes else 0.5)
        if p.is_alive():
            p.kill()
            p.join()
        if rank not in outcomes:
            how = "still running at the timeout" if p.exitcode in (None, -9) else \
                f"exited with code {p.exitcode} without reporting"
            outcomes[rank] = Outcome(rank, False, error=how)
    return [outcomes[rank] for rank in range(world_size)]
