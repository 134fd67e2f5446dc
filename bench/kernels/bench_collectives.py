"""CPU tensor-parallel all-reduce between processes of this host: fastgen's shared-memory
collective against torch.distributed's gloo, in the same run, at 4 KB to 16 MB of bf16 and 2 and
3 ranks (one thread each). Reports the median latency per call and the bus bandwidth
(2 (R - 1) / R x bytes / time, NCCL's convention, so ranks counts compare), and checks that both
give the float32 sum.

    python bench/kernels/bench_collectives.py [--quick] [--json collectives.json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports

SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20]  # bytes of bf16


def _rank(rank: int, world: int, port: int, sizes: list[int], repeats: int, results) -> None:
    import torch
    import torch.distributed as dist
    from fastgen import ops
    from fastgen.distributed import SHM_BUFFER_BYTES

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    box = [f"fastgen-bench-{os.getpid()}" if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    shm = ops.shm_group_init(box[0], world, rank, SHM_BUFFER_BYTES, 60.0)
    backends = {"shm": lambda x: ops.shm_all_reduce(x, shm),
                "gloo": lambda x: dist.all_reduce(x)}
    rows = []
    for nbytes in sizes:
        n = nbytes // 2
        base = torch.randn(n, generator=torch.Generator().manual_seed(rank)).bfloat16()
        want = sum(torch.randn(n, generator=torch.Generator().manual_seed(r)).bfloat16().float()
                   for r in range(world))
        for name, fn in backends.items():
            x = base.clone()
            fn(x)
            torch.testing.assert_close(x.float(), want, atol=0.05, rtol=0.02)
            times = []
            for _ in range(repeats):
                x.copy_(base)
                dist.barrier()
                start = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - start)
            # every rank's time counts: the call ends when the slowest rank's does
            slowest = torch.tensor(sorted(times)[len(times) // 2])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            rows.append({"ranks": world, "bytes": nbytes, "backend": name,
                         "us": slowest.item() * 1e6,
                         "bus_gb_s": 2 * (world - 1) / world * nbytes / slowest.item() / 1e9})
    ops.shm_group_destroy(shm)
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def run_world(world: int, sizes: list[int], repeats: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    from fastgen.engine.parallel import free_port

    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, sizes, repeats, results))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = results.get(timeout=600)
    for p in procs:
        p.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, fewer repeats")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    from bench.common import run_metadata, save_json

    sizes = [4 << 10, 1 << 20] if args.quick else SIZES
    results = {**run_metadata("cpu"), "all_reduce": []}
    print(f"{results['device_name']}; all_reduce of bf16, one thread per rank")
    print("ranks     bytes  backend   latency us   bus GB/s")
    for world in (2, 3):
        for row in run_world(world, sizes, 10 if args.quick else 50):
            results["all_reduce"].append(row)
            print(f"{row['ranks']:>5} {row['bytes']:>9}  {row['backend']:<8} {row['us']:11.1f} "
                  f"{row['bus_gb_s']:10.2f}")
    if args.json:
        save_json(args.json, results)


if __name__ == "__main__":
    main()
