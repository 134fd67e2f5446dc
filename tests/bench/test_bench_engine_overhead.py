"""bench/e2e/bench_engine_overhead.py at toy scale: both modes and the breakdown are measured at
every batch size, the phases add up to the step, and the benchmark leaves the engine as it found
it (no timer left wrapped)."""

import pytest


@pytest.fixture(scope="module")
def bench():
    from bench.e2e import bench_engine_overhead

    return bench_engine_overhead


def test_toy_run(bench, tmp_path, capsys):
    out = tmp_path / "overhead.json"
    results = bench.main(["--batch-sizes", "1,3", "--max-tokens", "5", "--min-steps", "6",
                          "--json", str(out)])
    assert out.is_file() and "host = step - forward" in capsys.readouterr().out
    for point in results["points"].values():
        assert set(point) == {"generate", "generate+breakdown", "stream", "cumulative"}
        for measured in point.values():
            assert measured["steps"] >= 6 and 0 < measured["forward"] < measured["step"]
            assert measured["host"] == pytest.approx(measured["step"] - measured["forward"])
        split = point["generate+breakdown"]
        parts = ["schedule", "prepare", "forward", "sample", "run_other", "detokenize",
                 "outputs", "step_other"]
        assert sum(split[p] for p in parts) == pytest.approx(split["step"])
        assert all(split[p] >= 0 for p in ("schedule", "prepare", "sample", "detokenize"))


def test_timers_are_put_back(bench, tmp_path):
    from fastgen import LLM
    from fastgen.engine import engine as engine_module
    from fastgen.engine.detokenizer import IncrementalDetokenizer

    llm = LLM(str(bench.tiny_model(tmp_path)), dtype="float32", device="cpu")
    append, output = IncrementalDetokenizer.step, engine_module._Request.output
    bench.measure(llm, "stream", 2, 8, 3, 2, True, seed=0)
    assert IncrementalDetokenizer.step is append and engine_module._Request.output is output
    assert "step" not in vars(llm.engine) and "forward" not in vars(llm.engine.model_runner.model)
