"""fastgen-serve --tensor-parallel-size 2 on loopback: the openai client gets streaming and n > 1
completions whose greedy tokens are a single process's; killing the worker makes the next request
a 503 naming it, and the server exit non-zero instead of hanging. And the same server started by
torchrun (the several-node layout), stopped cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastgen import LLM, SamplingParams
from fastgen.engine.parallel import free_port

from tests.engine.tiny_model import save_tiny_llama
from tests.entrypoints.test_serve_cli import wait_for_url


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                children.append(int(entry))
    return children


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-tp-serve"))


@pytest.fixture(scope="module")
def want(tiny_path):
    """One process's greedy completion of the prompt the servers get."""
    return LLM(str(tiny_path), dtype="float32", device="cpu").generate(
        PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text


PROMPT = "Hello there"


def serve_args(tiny_path) -> list[str]:
    """fastgen-serve's arguments: the tiny model at TP 2 on a port the OS picks."""
    return ["--model", str(tiny_path), "--port", "0", "--served-model-name", "tiny", "--dtype",
            "float32", "--device", "cpu", "--cpu-kv-cache-gib", "0.01", "--max-num-seqs", "4",
            "--tensor-parallel-size", "2", "--log-level", "warning"]


def complete(url: str, **kwargs):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True}, **kwargs)


def test_tp2_server_serves_and_fails_cleanly_when_a_worker_dies(tiny_path, want, tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastgen.entrypoints.serve", *serve_args(tiny_path)],
            stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "FASTGEN_TP_TIMEOUT_S": "20"})
    try:
        url = wait_for_url(process, log, timeout=120)
        assert [c.text for c in complete(url, n=2).choices] == [want, want]
        assert "".join(chunk.choices[0].text for chunk in complete(url, stream=True)) == want

        workers = [pid for pid in child_pids(process.pid)
                   if b"spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        time.sleep(0.5)
        response = httpx.post(f"{url}/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
        assert response.status_code == 503, response.text
        assert "tensor-parallel" in response.json()["error"]["message"]
        assert process.wait(timeout=60) == 1
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            finally:
                process.kill()
    text = log.read_text()
    assert "fastgen-serve: error: the engine stopped: tensor-parallel step failed" in text, text


def test_tp2_server_under_torchrun(tiny_path, want, tmp_path):
    """The several-node layout on one host: torchrun starts both ranks; rank 0 serves HTTP, rank
    1 runs its shard; SIGINT stops both cleanly."""
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-port", str(free_port()), "-m", "fastgen.entrypoints.serve",
             *serve_args(tiny_path)],
            stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        url = wait_for_url(process, log, timeout=120)
        assert complete(url).choices[0].text == want
        # Stop rank 0 (the server) alone: it tells rank 1 to stop, both exit 0, and so does
        # torchrun. (A Ctrl-C to the whole group would make torchrun itself exit 1.)
        rank0 = [pid for pid in child_pids(process.pid)
                 if b"RANK=0" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\x00")]
        assert len(rank0) == 1
        os.kill(rank0[0], signal.SIGINT)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
