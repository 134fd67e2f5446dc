"""fastgen-run and fastgen-serve expose the same engine flags, EngineConfig.add_cli_args's, with the
same defaults and help; the flags fastgen-run gained reach the engine; -tp 2 is one error line
before anything loads; the README's engine flag table, which both CLIs' sections point to, lists
every engine flag with its default."""

import re
from pathlib import Path

import pytest

from fastgen.config import EngineConfig, engine_flags
from fastgen.entrypoints import run, serve
from fastgen.entrypoints.cli import Parser

from tests.entrypoints.llm_spy import llm_arguments

README = Path(__file__).resolve().parents[2] / "README.md"


def engine_options(parser) -> dict[str, tuple]:
    group = next(g for g in parser._action_groups if g.title == "engine options")
    return {a.option_strings[0]: (a.option_strings, a.dest, a.default, a.help)
            for a in group._group_actions}


def test_run_and_serve_share_the_engine_flags():
    expected = engine_options(EngineConfig.add_cli_args(Parser(prog="test")))
    assert engine_options(run.build_parser()) == expected
    assert engine_options(serve.build_parser()) == expected


@pytest.mark.parametrize("main, argv", [(run.main, ["--prompt", "hi", "--seed", "5"]),
                                        (serve.main, ["--port", "0"])])
def test_engine_flags_reach_the_engine(monkeypatch, capsys, main, argv):
    seen = llm_arguments(monkeypatch, main, [
        "--model", "m", *argv, "--max-model-len", "64", "--max-num-seqs", "3",
        "--max-num-batched-tokens", "100", "--block-size", "8", "--cpu-kv-cache-gib", "0.5",
        "--no-prefix-caching", "--load-format", "random", "--engine-seed", "7", "-tp", "1"])
    assert (seen["model"], seen["max_model_len"], seen["max_num_seqs"]) == ("m", 64, 3)
    assert (seen["max_num_batched_tokens"], seen["block_size"]) == (100, 8)
    assert (seen["cpu_kv_cache_gib"], seen["enable_prefix_caching"]) == (0.5, False)
    assert (seen["load_format"].value, seen["seed"], seen["tensor_parallel_size"]) == \
        ("random", 7, 1)  # fastgen-run's --seed is the sampling seed, not the engine's


@pytest.mark.parametrize("main, prog, argv", [(run.main, "fastgen-run", ["--prompt", "hi"]),
                                              (serve.main, "fastgen-serve", [])])
def test_a_tensor_parallel_size_below_one_is_refused_in_one_line(capsys, main, prog, argv):
    assert main(["--model", "m", *argv, "-tp", "0"]) == 2
    assert capsys.readouterr().err == (f"{prog}: error: --tensor-parallel-size must be at least 1, "
                                       f"got 0\n")


def readme_section(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) + len(heading):]
    return section[:re.search(r"\n##+ ", section).start()]


def test_readme_engine_table_lists_every_flag_with_its_default():
    rows = [line.split(" | ") for line in
            readme_section("### Engine flags (`fastgen-run` and `fastgen-serve`)").splitlines()
            if line.startswith("| `-")]
    for spec in engine_flags().values():
        row = next((r for r in rows if f"`{spec.option}`" in r[0]), None)
        assert row is not None, spec.option
        for option in filter(None, [spec.flag.alias, spec.flag.off]):
            assert f"`{option}`" in row[0], option
        if spec.type is bool:
            expected = "on" if spec.default else "off"
        else:
            expected = spec.flag.default_text if spec.default is None else f"`{spec.cli_default}`"
        assert row[1] == expected, spec.option
    for heading in ("## `fastgen-run`", "## Serving: `fastgen-serve`"):
        assert "engine flags" in readme_section(heading)
