"""bench/common.py on the CPU at toy sizes: the machine limits are positive and best() keeps the
higher of each, both timers time what they are given, run_metadata has the keys (in order) that
the roofline benchmarks' JSON starts with, the CPU's name carries its ISA flags, save_json keeps
key order, and the plot helpers say so where matplotlib is missing."""

import datetime
import json
import platform
import sys
import time

import torch

from bench.common import (
    MachineLimits,
    Timer,
    begin_plot,
    cpu_name,
    device_name,
    pyplot,
    run_metadata,
    save_json,
)


def test_machine_limits_are_positive_and_best_keeps_the_higher():
    limits = MachineLimits.measure("cpu", torch.float32, matmul_size=64, copy_bytes=1 << 16)
    assert limits.copy_gb_s > 0 and limits.matmul_tflop_s > 0 and limits.matmul_size == 64
    other = MachineLimits(2 * limits.copy_gb_s, limits.matmul_tflop_s / 2, 64)
    assert limits.best(other) == MachineLimits(other.copy_gb_s, limits.matmul_tflop_s, 64)


def test_timers_time_the_call():
    clock = Timer("cpu")
    calls = []

    def nap():
        calls.append(None)
        time.sleep(0.001)

    assert 0.001 <= clock.median_s(nap, repeats=3) < 1.0
    assert len(calls) == 1 + 3  # the warm-up, then each timed call
    assert 1e3 <= clock.loop_us(nap) < 1e6


def test_run_metadata_has_the_keys_in_order():
    meta = run_metadata("cpu")
    assert list(meta) == ["device_name", "date", "commit", "torch", "transformers"]
    assert meta["device_name"] == device_name("cpu") == \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    assert datetime.datetime.fromisoformat(meta["date"]).tzinfo is not None
    assert meta["commit"] and meta["torch"] == torch.__version__ and meta["transformers"]


def test_cpu_name_carries_the_isa_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx avx2 avx512f "
                   "avx512bw avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_name(x86) == "Some Xeon (avx2 avx512f avx512_bf16 amx_bf16)"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\n")  # no model name
    assert cpu_name(arm) == f"{platform.machine()} (sve bf16)"
    assert cpu_name(tmp_path / "missing") in (platform.processor(), platform.machine())


def test_save_json_keeps_key_order(tmp_path):
    results = {"z": 1, "a": {"y": [1.5, None], "b": "x"}}
    save_json(tmp_path / "r.json", results, indent=1)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == results and list(json.loads(text)) == ["z", "a"]
    assert text == json.dumps(results, indent=1) + "\n"


def test_no_matplotlib_no_figure_and_a_notice(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed
    assert pyplot() is None and begin_plot("x.png") is None
    out = capsys.readouterr().out
    assert out.count("matplotlib is not installed") == 2 and "--plot-from" in out
