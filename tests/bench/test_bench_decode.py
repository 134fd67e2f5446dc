"""bench/e2e/bench_decode.py end to end at toy scale on the CPU: a synthetic model preset (config
plus word-level tokenizer, random weights: the 8B preset, shrunk) through fastgen and HF
generate, the JSON's fields and ranges, the byte and FLOP counts against the config by hand, and
the plot drawn again from the JSON (or the one-line notice where matplotlib is missing)."""

import json
import sys

import pytest

from bench.e2e.presets import LLAMA31_8B, SYNTHETIC_MODELS

# Llama-3.1-8B's preset (rope scaling, untied head) shrunk.
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300}
BATCHES = [1, 3]
PROMPT_LEN, GEN_LEN = 24, 6


@pytest.fixture(scope="module")
def bench():
    from bench.e2e import bench_decode

    return bench_decode


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    SYNTHETIC_MODELS["tiny"] = {**LLAMA31_8B, **TINY}
    try:
        results = bench.main(["--model", "tiny", "--device", "cpu", "--dtype", "bfloat16",
                              "--batch-sizes", ",".join(map(str, BATCHES)),
                              "--prompt-len", str(PROMPT_LEN), "--gen-len", str(GEN_LEN),
                              "--matmul-size", "256", "--json", str(out)])
    finally:
        del SYNTHETIC_MODELS["tiny"]
    return results, out


def test_every_point_has_both_engines_with_sane_numbers(run):
    results, out = run
    assert json.loads(out.read_text()) == results
    assert results["weights"] == "random" and results["device"] == "cpu"
    assert results["limits"]["copy_gb_s"] > 0 and results["limits"]["matmul_tflop_s"] > 0
    assert [p["batch"] for p in results["points"].values()] == BATCHES
    for point in results["points"].values():
        batch = point["batch"]
        for engine in ("fastgen", "hf"):
            row = point[engine]
            assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
            assert row["decode_tok_s"] == pytest.approx(batch / row["decode_step_s"])
            assert 0 < row["bandwidth_utilisation"] < 1.5
            assert row["roofline_step_s"] > 0 and row["step_over_roofline"] > 1 / 1.5
            assert row["roofline_bound"] in ("memory", "compute")
            # Every timed step decodes the whole batch somewhere between the first output
            # token and the last.
            assert PROMPT_LEN + 1 <= row["mean_context"] <= PROMPT_LEN + GEN_LEN - 1
            assert 1 <= row["decode_steps_timed"] <= GEN_LEN - 1
        assert point["decode_ratio"] == pytest.approx(
            point["fastgen"]["decode_tok_s"] / point["hf"]["decode_tok_s"])
        assert point["prefill_ratio"] > 0


def test_bytes_and_flops_follow_the_config(run):
    results, _ = run
    h, i, layers, v = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"], \
        TINY["vocab_size"]
    q, kv = TINY["num_attention_heads"] * 16, TINY["num_key_value_heads"] * 16
    matmul = layers * (2 * h * q + 2 * h * kv + 3 * h * i) + v * h  # the LM head, not the table
    norms = layers * 2 * h + h
    assert results["cost"] == {"weight_bytes": 2 * (matmul + norms), "row_bytes": 2 * h,
                               "matmul_weights": matmul,
                               "kv_bytes_per_key": 2 * layers * kv * 2,
                               "flops_per_key": 4 * layers * q,
                               "expert_bytes": 0, "experts": 0, "experts_per_token": 0}
    row = results["points"]["3"]["fastgen"]
    keys = 3 * row["mean_context"]
    assert row["bytes_per_step"] == pytest.approx(
        2 * (matmul + norms) + 3 * 2 * h + keys * 2 * layers * kv * 2)
    assert row["flops_per_step"] == pytest.approx(2 * matmul * 3 + keys * 4 * layers * q)


def test_plot_from_json(bench, run, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "tiny.png"
    bench.main(["--plot-from", str(run[1]), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_matplotlib_no_plot_and_a_notice(bench, run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed
    assert bench.plot(run[0], str(tmp_path / "none.png")) is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "none.png").exists()
