"""bench/e2e/bench_prefill.py end to end at toy scale on the CPU: the 8B preset shrunk, through
fastgen chunked and in one step and through HF; the JSON's fields against each other, the step
counts against the chunk size, the FLOPs against the config by hand, an HF length that runs out
of memory, the once-only timing of long points, and the plot drawn again from the JSON."""

import json
import math
import sys
from pathlib import Path
from statistics import median

import pytest
import torch

from bench.e2e.presets import SYNTHETIC_MODELS
from tests.bench.test_bench_decode import TINY

LENGTHS, CHUNK, REPEATS = [24, 40], 16, 2


@pytest.fixture(scope="module")
def bench():
    from bench.e2e import bench_prefill

    return bench_prefill


def run_tiny(bench, json_path: Path, *extra: str) -> dict:
    # The presets --model takes (bench_prefill's runs go through roofline.run_and_save).
    SYNTHETIC_MODELS["tiny"] = {**SYNTHETIC_MODELS["llama3.1-8b"], **TINY}
    try:
        return bench.main(["--model", "tiny", "--device", "cpu", "--dtype", "bfloat16",
                           "--prompt-lens", ",".join(map(str, LENGTHS)),
                           "--chunk-tokens", str(CHUNK), "--matmul-size", "256",
                           "--json", str(json_path), *extra])
    finally:
        del SYNTHETIC_MODELS["tiny"]


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    return run_tiny(bench, out, "--repeats", str(REPEATS)), out


def test_every_length_has_every_engine_with_consistent_numbers(run):
    results, out = run
    assert json.loads(out.read_text()) == results
    assert results["weights"] == "random" and results["matmul_tflop_s"] > 0
    assert results["max_num_batched_tokens"] == {"fastgen_chunked": CHUNK,
                                                 "fastgen_one_step": max(LENGTHS)}
    assert [p["prompt_len"] for p in results["points"].values()] == LENGTHS
    for point in results["points"].values():
        length = point["prompt_len"]
        steps = {"fastgen_chunked": math.ceil(length / CHUNK), "fastgen_one_step": 1, "hf": 1}
        for engine, expected_steps in steps.items():
            row = point[engine]
            assert row["steps"] == expected_steps
            assert len(row["runs_s"]) == REPEATS
            assert row["ttft_s"] == pytest.approx(median(row["runs_s"]))
            assert row["tok_s"] == pytest.approx(length / row["ttft_s"])
            assert row["tflop_s"] == pytest.approx(point["flops"] / row["ttft_s"] / 1e12)
            assert row["matmul_fraction"] == pytest.approx(
                row["tflop_s"] / results["matmul_tflop_s"])
        for engine, ratio in point["vs_hf"].items():
            assert ratio == pytest.approx(point[engine]["tok_s"] / point["hf"]["tok_s"])
        assert set(point["vs_hf"]) == {"fastgen_chunked", "fastgen_one_step"}


def test_flops_follow_the_config(run):
    results, _ = run
    h, i, layers, v = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"], \
        TINY["vocab_size"]
    heads, d = TINY["num_attention_heads"], TINY["head_dim"]
    q, kv = heads * d, TINY["num_key_value_heads"] * d
    matmul = layers * (2 * h * q + 2 * h * kv + 3 * h * i)  # the LM head apart
    assert results["cost"] == {"matmul_weights": matmul, "head_weights": v * h,
                               "flops_per_pair": 4 * layers * heads * d}
    for point in results["points"].values():
        n = point["prompt_len"]
        attention = 4 * layers * heads * d * n * (n + 1) // 2
        assert point["flops"] == 2 * matmul * n + 2 * v * h + attention


def test_hf_out_of_memory_is_recorded_and_the_run_goes_on(bench, tmp_path, monkeypatch):
    make = bench.hf_first_token

    def short_only(model, device):  # the longer prompt runs out of memory
        first_token, logits = make(model, device)

        def guarded(prompt):
            if len(prompt) > LENGTHS[0]:
                raise torch.OutOfMemoryError("tiny test")
            return first_token(prompt)

        return guarded, logits

    monkeypatch.setattr(bench, "hf_first_token", short_only)
    results = run_tiny(bench, tmp_path / "oom.json", "--repeats", "1")
    short, long = results["points"].values()
    assert "ttft_s" in short["hf"] and long["hf"] == {"error": "out of memory"}
    assert "vs_hf" in short and "vs_hf" not in long
    assert "ttft_s" in long["fastgen_one_step"]


def test_a_long_warm_up_is_timed_once(bench):
    calls = []

    def first_token(prompt):
        calls.append(len(prompt))
        return 1

    assert len(bench.measure(first_token, [0] * 3, "cpu", repeats=4, long_s=0.0).runs_s) == 1
    assert len(bench.measure(first_token, [0] * 3, "cpu", repeats=4, long_s=60.0).runs_s) == 4
    assert calls == [3] * 7  # each with its warm-up


def test_plot_from_json(bench, run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "tiny.png"
    bench.main(["--plot-from", str(run[1]), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "fastgen, one step" in table and "HF transformers, sdpa" in table


def test_no_matplotlib_no_plot_and_a_notice(bench, run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed
    assert bench.plot(run[0], str(tmp_path / "none.png")) is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "none.png").exists()
