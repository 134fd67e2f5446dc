"""Data parallelism with torchrun on CPU (gloo): 2 processes on one machine, and 2 "nodes" of one
process each meeting at node 0's address on loopback, write exactly the rows, and with the fixed
seed exactly the responses, of a single-process run. The second node runs in its own folder, so
its parts are not on rank 0's file system: rank 0 gets its rows over gloo.

The nodes meet by torchrun's static rendezvous (--master-addr, --node-rank), as the README's
multi-node commands do: under the c10d rendezvous each torchrun agent polls a store that one of
the agents hosts until it exits, so the node that finishes first can take the store with it and
fail the other node's torchrun (RendezvousConnectionError) after the job has succeeded."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastgen.engine.parallel import free_port
from fastgen.entrypoints.generate import main

from tests.generation.conftest import gsm8k_table, job_args, write_parquet

ROWS = 11  # odd: the shards differ in size
KEYS = {"rollout.seed": 7, "data.batch_size": 3, "data.n_samples": 2}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    """The input, and the single-process run's output table."""
    folder = tmp_path_factory.mktemp("dp")
    data = write_parquet(gsm8k_table(ROWS), folder / "in.parquet")
    single = folder / "single.parquet"
    assert main(job_args(tiny_model, data, single, **KEYS)) == 0
    return tiny_model, data, pq.read_table(single)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_two_processes(model, data, out, **keys) -> subprocess.CompletedProcess:
    """The job under torchrun with 2 processes on this machine; it must succeed."""
    run = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()),
                          "-m", "fastgen.entrypoints.generate",
                          *job_args(model, data, out, **KEYS, **keys)],
                         stderr=subprocess.PIPE, text=True, timeout=180, env=env())
    assert run.returncode == 0, run.stderr
    return run


def test_two_processes_on_one_machine(job, tmp_path):
    model, data, single = job
    out = tmp_path / "dp.parquet"
    run = run_two_processes(model, data, out)
    assert pq.read_table(out).equals(single)
    assert run.stderr.count(f"{ROWS} rows (0 resumed from parts)") == 1  # rank 0 alone reports


def run_two_nodes(model, data, tmp_path, extra_env=None, **keys) -> Path:
    """The job on two torchrun "nodes" of one process each, meeting at node 0 on loopback, each
    in its own folder (so the parts of one are not on the other's file system). Returns the one
    output file, written by the node holding rank 0."""
    port = str(free_port())
    nodes = []
    for rank in range(2):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        nodes.append(subprocess.Popen(
            [*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
             "--master-addr", "127.0.0.1", "--master-port", port,
             "-m", "fastgen.entrypoints.generate",
             *job_args(model, data, "out.parquet", **KEYS, **keys), "--keep-parts"],
            cwd=folder, stderr=subprocess.PIPE, text=True, env={**env(), **(extra_env or {})}))
    errors = [node.communicate(timeout=180)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors
    outputs = [tmp_path / f"node{rank}" / "out.parquet" for rank in range(2)]
    written = [path for path in outputs if path.exists()]
    assert len(written) == 1
    return written[0]


def test_two_nodes_on_loopback(job, tmp_path):
    model, data, single = job
    assert pq.read_table(run_two_nodes(model, data, tmp_path)).equals(single)
    rows_by_node = [sorted(row for part in (tmp_path / f"node{rank}" / "out.parquet.parts")
                           .glob("rows-*") for row in pq.read_table(part).column("_row").to_pylist())
                    for rank in range(2)]  # each node generated its own shard, and only that
    assert sorted(rows_by_node) == [list(range(0, 6)), list(range(6, ROWS))]


def test_tensor_parallel_two_ranks_under_torchrun(job, tmp_path):
    """TP 2 x DP 1: rank 1 is rank 0's engine's worker; the rows and responses are the single
    process's (the tiny model's sampled tokens survive the TP rounding)."""
    model, data, single = job
    out = tmp_path / "tp.parquet"
    run_two_processes(model, data, out, **{"rollout.tensor_model_parallel_size": 2})
    assert pq.read_table(out).equals(single)


def test_tensor_parallel_from_one_process(job, tmp_path):
    """No torchrun: the process starts its worker itself."""
    model, data, single = job
    out = tmp_path / "tp1.parquet"
    assert main(job_args(model, data, out, **KEYS,
                         **{"rollout.tensor_model_parallel_size": 2})) == 0
    assert pq.read_table(out).equals(single)


def test_tensor_parallel_over_two_nodes_on_loopback(job, tmp_path):
    """TP 2 over two "nodes" of one process each. Both are this host, so
    FASTGEN_CPU_COLLECTIVES=gloo makes their collectives take the path of ranks on different
    hosts."""
    model, data, single = job
    out = run_two_nodes(model, data, tmp_path, {"FASTGEN_CPU_COLLECTIVES": "gloo"},
                        **{"rollout.tensor_model_parallel_size": 2})
    assert pq.read_table(out).equals(single)
