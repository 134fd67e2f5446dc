"""fastgen-run end to end on the tiny test model: its JSON output is what LLM.generate returns,
and every user error is one stderr line and a non-zero exit, never a traceback."""

import io
import json
import subprocess
import sys

import pytest

from fastgen import LLM, SamplingParams
from fastgen.entrypoints import run
from tests.engine.tiny_model import save_tiny_llama
from tests.entrypoints.llm_spy import llm_arguments


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def fastgen_run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastgen.entrypoints.run", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def assert_one_error_line(stderr: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgen-run: error: "), stderr


def test_json_output_matches_llm_generate(tiny_path):
    prompts = ["The capital of France is", "Hi"]
    result = fastgen_run("--model", str(tiny_path), "--json", "--no-chat", "--temperature", "0",
                         "--max-tokens", "10", "--dtype", "float32",
                         *[arg for p in prompts for arg in ("--prompt", p)])
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    llm = LLM(str(tiny_path), dtype="float32", device="cpu", cpu_kv_cache_gib=0.01)
    expected = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    assert [r["prompt"] for r in rows] == prompts
    assert [r["token_ids"] for r in rows] == [o.token_ids for o in expected]
    assert [r["text"] for r in rows] == [o.text for o in expected]
    assert [r["finish_reason"] for r in rows] == [o.finish_reason.value for o in expected]


def test_prompt_from_stdin_and_too_long_prompt(tiny_path):
    result = fastgen_run("--model", str(tiny_path), "--no-chat", "--max-tokens", "3",
                         stdin="Once upon a time\n")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    result = fastgen_run("--model", str(tiny_path), "--no-chat", stdin="Once upon a time " * 80)
    assert result.returncode != 0
    assert_one_error_line(result.stderr)
    assert "context is 256 tokens" in result.stderr


def test_corrupt_checkpoint_and_unknown_model(tiny_path, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in tiny_path.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    for model in (str(broken), "no-such-model", str(tmp_path / "missing")):
        result = fastgen_run("--model", model, "--prompt", "hi")
        assert result.returncode != 0
        assert_one_error_line(result.stderr)


@pytest.mark.parametrize("args", [
    ["--dtype", "int3"],
    ["--temperature", "-1"],
    ["--top-p", "1.5"],
    ["--top-k", "0"],
    ["--max-tokens", "0"],
    ["--device", "tpu"],
    ["--max-tokens", "many"],
    ["--no-such-flag"],
])
def test_bad_arguments_are_one_line_errors(tiny_path, capsys, args):
    status = run.main(["--model", str(tiny_path), "--prompt", "hi", *args])
    captured = capsys.readouterr()
    assert status != 0 and captured.out == ""
    assert_one_error_line(captured.err)


def test_empty_stdin_is_an_error(tiny_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert run.main(["--model", str(tiny_path)]) != 0
    assert_one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag, eager", [([], False), (["--enforce-eager"], True)])
def test_enforce_eager_reaches_the_engine(capsys, monkeypatch, flag, eager):
    argv = ["--model", "m", "--prompt", "hi", *flag]
    assert llm_arguments(monkeypatch, run.main, argv)["enforce_eager"] is eager
    assert "step graphs on the CPU" in " ".join(run.build_parser().format_help().split())
