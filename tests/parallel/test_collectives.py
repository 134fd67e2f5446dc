"""fastgen's CPU tensor-parallel collectives (shared memory, csrc/cpu/shm_comm.h) across spawned
processes: all_reduce against the float32 sum in rank order (bitwise, and the same bits on every
rank), all_gather against concatenation, every float dtype, odd sizes, tensors larger than the
shared buffer (chunks), repeated calls (the double buffer's reuse), the gloo fallback, and a peer
that exits or stalls (a clear error within the timeout, never a hang)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from tests.parallel.ranks import run_ranks

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# 1, a SIMD tail, and more than one 8 MiB chunk for every dtype (float32: 2.1M elements)
SIZES = (1, 37, 1000, (8 << 20) // 4 + 4099)


def inputs(rank: int, size: int, dtype: torch.dtype, call: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * call + 17 * size + rank)
    return torch.randn(size, generator=g).to(dtype)


def expected_sum(world: int, size: int, dtype: torch.dtype, call: int = 0) -> torch.Tensor:
    total = inputs(0, size, dtype, call).float()
    for r in range(1, world):
        total = total + inputs(r, size, dtype, call).float()
    return total.to(dtype)


def check_collectives(rank: int, world: int) -> str:
    import torch.distributed as dist
    from fastgen.distributed import TensorParallelGroup

    group = TensorParallelGroup.create(dist.group.WORLD)
    assert group.backend == "shm", group.backend
    for dtype in DTYPES:
        for size in SIZES:
            x = inputs(rank, size, dtype)
            group.all_reduce(x)
            assert torch.equal(x, expected_sum(world, size, dtype)), (dtype, size)
            # every rank holds the same bits
            gathered = group.all_gather(x.view(1, -1), dim=0)
            assert all(torch.equal(row, x) for row in gathered), (dtype, size)
            shards = [inputs(r, size, dtype)[: size // 2 + 1].view(1, -1) for r in range(world)]
            got = group.all_gather(shards[rank], dim=-1)
            assert torch.equal(got, torch.cat(shards, dim=-1)), (dtype, size)
    for call in range(1, 41):  # the buffers are reused every other call
        x = inputs(rank, 300 + call, torch.bfloat16, call)
        group.all_reduce(x)
        assert torch.equal(x, expected_sum(world, 300 + call, torch.bfloat16, call)), call
    x3 = torch.arange(24, dtype=torch.float32).view(2, 3, 4) + rank
    got = group.all_gather(x3, dim=1)
    want = torch.cat([torch.arange(24, dtype=torch.float32).view(2, 3, 4) + r
                      for r in range(world)], dim=1)
    assert torch.equal(got, want)
    # rank 0's objects: empty, small, and larger than the 8 MiB buffer (chunks); a tensor
    for obj in (None, {"ids": list(range(100))}, b"x" * (9 << 20), torch.arange(7)):
        got = group.broadcast_object(obj if rank == 0 else "ignored")
        assert (torch.equal(got, obj) if isinstance(obj, torch.Tensor) else got == obj)
        group.all_reduce(torch.ones(3))  # interleaved with the other collectives
    assert group.broadcast_object("stop" if rank == 0 else None, patient=True) == "stop"
    group.barrier()
    group.destroy()
    return "ok"


@pytest.mark.parametrize("world", [2, 3])
def test_shm_collectives(world):
    outcomes = run_ranks(check_collectives, world, timeout=240)
    assert all(o.ok for o in outcomes), outcomes


def check_gloo_fallback(rank: int, world: int) -> None:
    import torch.distributed as dist
    from fastgen.distributed import TensorParallelGroup

    group = TensorParallelGroup.create(dist.group.WORLD)
    assert group.backend == "gloo"
    x = inputs(rank, 1000, torch.float32)
    group.all_reduce(x)
    torch.testing.assert_close(x, expected_sum(world, 1000, torch.float32))
    got = group.all_gather(torch.full((2, 1), float(rank)), dim=1)
    assert torch.equal(got, torch.arange(world, dtype=torch.float32).expand(2, world))


def test_gloo_fallback():
    outcomes = run_ranks(check_gloo_fallback, 2, env={"FASTGEN_CPU_COLLECTIVES": "gloo"})
    assert all(o.ok for o in outcomes), outcomes


def abandon_collective(rank: int, world: int, how: str) -> float:
    import torch.distributed as dist
    from fastgen.distributed import TensorParallelGroup

    group = TensorParallelGroup.create(dist.group.WORLD)
    group.all_reduce(torch.ones(10))
    if rank == 1:
        if how == "exit":
            os._exit(3)
        time.sleep(30)  # alive, but never arrives
        return 0.0
    start = time.monotonic()
    group.all_reduce(torch.ones(10))
    return time.monotonic() - start


def test_a_peer_that_exits_is_an_error():
    outcomes = run_ranks(abandon_collective, 2, "exit", timeout=60)
    assert not outcomes[0].ok
    assert "tensor-parallel rank 1 (pid" in outcomes[0].error
    assert "exited; rank 0 cannot finish the collective" in outcomes[0].error
    assert "exited with code 3" in outcomes[1].error


def test_a_peer_that_stalls_times_out():
    outcomes = run_ranks(abandon_collective, 2, "stall", timeout=60,
                         env={"FASTGEN_TP_TIMEOUT_S": "2"})
    assert not outcomes[0].ok
    assert "did not reach collective 2 within 2 s" in outcomes[0].error


def test_shm_group_init_checks():
    from fastgen import ops

    with pytest.raises(RuntimeError, match=r"rank 2 is outside a group of 2"):
        ops.shm_group_init("fastgen-test", 2, 2, 4096, 1.0)
    with pytest.raises(RuntimeError, match="buffer_bytes must be a positive multiple of 64"):
        ops.shm_group_init("fastgen-test", 2, 0, 100, 1.0)
    with pytest.raises(RuntimeError, match="without '/'"):
        ops.shm_group_init("a/b", 2, 0, 4096, 1.0)
    with pytest.raises(RuntimeError, match="only 1 of 2 ranks joined within 0.2 s"):
        ops.shm_group_init(f"fastgen-test-{os.getpid()}", 2, 0, 4096, 0.2)
    assert not any(name.startswith(f"fastgen-test-{os.getpid()}") for name in os.listdir("/dev/shm"))
    with pytest.raises(RuntimeError, match="shm group 12345 does not exist"):
        ops.shm_all_reduce(torch.ones(3), 12345)
