"""NCCL through the extension (csrc/cuda/nccl.cu), on a GPU: one rank (init, all-reduce,
all-gather, capture in a CUDA graph and replay), and two ranks on one GPU where the loaded NCCL
allows it (2.30+ with NCCL_MULTI_RANK_GPU_ENABLE=1; skipped with the reason otherwise). On a
CPU-only build the ops are absent and say so."""

from __future__ import annotations

import pytest
import torch
from fastgen import ops

from tests.parallel.ranks import run_ranks


def check_nccl(rank: int, world: int) -> int:
    import torch.distributed as dist
    from fastgen.distributed import TensorParallelGroup

    torch.cuda.set_device(0)
    group = TensorParallelGroup.create(dist.group.WORLD, cuda=True)
    assert group.nccl_comm is not None
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.arange(1000, device="cuda").to(dtype) * (rank + 1)
        group.all_reduce(x)
        want = torch.arange(1000, device="cuda").to(dtype) * sum(r + 1 for r in range(world))
        torch.testing.assert_close(x, want)
        got = group.all_gather(torch.full((3, 2), float(rank), device="cuda", dtype=dtype), dim=-1)
        assert torch.equal(got.cpu(), torch.arange(world).repeat_interleave(2).expand(3, -1)
                           .to(dtype))
    # captured once, replayed on new values (the decode CUDA graphs' use)
    y = torch.ones(4096, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        group.all_reduce(y)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        group.all_reduce(y)
    y.fill_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.all(y == 2.0 * world)
    group.destroy()
    return ops.nccl_version()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nccl_one_rank():
    outcomes = run_ranks(check_nccl, 1, timeout=180)
    assert all(o.ok for o in outcomes), outcomes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nccl_two_ranks_on_one_gpu():
    version = ops.nccl_version()
    if version < 23000:
        pytest.skip(f"NCCL {version} refuses two ranks on one GPU (2.30+ allows it with "
                    f"NCCL_MULTI_RANK_GPU_ENABLE=1)")
    outcomes = run_ranks(check_nccl, 2, env={"NCCL_MULTI_RANK_GPU_ENABLE": "1"}, timeout=240)
    assert all(o.ok for o in outcomes), outcomes


def test_nccl_ops_say_when_the_build_has_none():
    if hasattr(torch.ops.fastgen, "nccl_init"):
        pytest.skip("this build has the NCCL ops")
    with pytest.raises(RuntimeError, match="no CUDA kernels, so no NCCL collectives"):
        ops.nccl_unique_id()
