"""fastgen-serve: bad flags are one stderr line and a non-zero exit, before any model loads; the
real CLI, started as a process on a port the OS picks, serves the tiny model (health, models, a
completion through the openai client, the API key from FASTGEN_API_KEY) and stops on SIGINT."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from fastgen.entrypoints import serve
from tests.engine.tiny_model import save_tiny_llama
from tests.entrypoints.llm_spy import llm_arguments


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-serve"))


def assert_one_error_line(stderr: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgen-serve: error: "), stderr


@pytest.mark.parametrize("args", [
    ["--port", "-1"],
    ["--port", "70000"],
    ["--port", "http"],
    ["--dtype", "int3"],
    ["--device", "tpu"],
    ["--max-num-seqs", "0"],
    ["--max-num-batched-tokens", "-4"],
    ["--block-size", "0"],
    ["--max-model-len", "0"],
    ["--cpu-kv-cache-gib", "0"],
    ["--gpu-memory-utilization", "1.5"],
    ["--max-waiting-requests", "0"],
    ["--max-body-bytes", "0"],
    ["--log-level", "loud"],
    ["--api-key", " "],
    ["--enable-prefix-caching", "--no-prefix-caching"],
    ["--no-such-flag"],
])
def test_bad_flags_are_one_line_errors(tiny_path, capsys, args):
    assert serve.main(["--model", str(tiny_path), *args]) == 2
    assert_one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag, eager", [([], False), (["--enforce-eager"], True)])
def test_enforce_eager_reaches_the_engine(capsys, monkeypatch, flag, eager):
    argv = ["--model", "m", "--port", "0", *flag]
    assert llm_arguments(monkeypatch, serve.main, argv)["enforce_eager"] is eager
    assert "step graphs on the CPU" in " ".join(serve.build_parser().format_help().split())


def test_unloadable_model_and_busy_port(tiny_path, tmp_path, capsys):
    assert serve.main(["--model", str(tmp_path / "missing"), "--port", "0"]) == 1
    assert_one_error_line(capsys.readouterr().err)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serve.main(["--model", str(tiny_path), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_the_cli_serves_the_model(tiny_path, tmp_path):
    log = tmp_path / "stderr.log"
    env = {**os.environ, "FASTGEN_API_KEY": "k3y"}
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastgen.entrypoints.serve", "--model", str(tiny_path),
             "--port", "0", "--served-model-name", "tiny", "--dtype", "float32", "--device",
             "cpu", "--cpu-kv-cache-gib", "0.01", "--max-num-seqs", "4", "--no-prefix-caching",
             "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        url = wait_for_url(process, log)
        assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 401  # the key is on
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["tiny"]
        result = client.completions.create(model="tiny", prompt="Hello", max_tokens=4,
                                           temperature=0, extra_body={"ignore_eos": True})
        assert result.choices[0].finish_reason == "length"
        assert result.usage.completion_tokens == 4
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=30) in (0, 130)
        finally:
            process.kill()
    assert "Traceback" not in log.read_text()


def wait_for_url(process: subprocess.Popen, log, timeout: float = 60) -> str:
    """The URL the CLI announces, once it answers /health."""
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        if url is None:
            match = re.search(r"serving 'tiny' at (http://\S+)", log.read_text())
            url = match and match[1]
        if url is not None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"fastgen-serve did not start:\n{log.read_text()}")
