"""EngineConfig's one flag list: every field of EngineConfig and of the configs nested in it is set
by a flag of add_cli_args (found by giving each flag a non-default value and watching which field
changes, so a field added without a flag fails here), every default is the dataclass's, a bad
value is a one-line error naming the flag (command line) or the field (Python), and
ParallelConfig accepts any tensor-parallel size but one data-parallel replica."""

import dataclasses

import pytest

from fastgen.config import CacheConfig, EngineConfig, LoadFormat, ParallelConfig
from fastgen.entrypoints.cli import Parser, UsageError

DEFAULTS = EngineConfig()


def engine_parser() -> Parser:
    return EngineConfig.add_cli_args(Parser(prog="test"))


def engine_actions(parser) -> list:
    group = next(g for g in parser._action_groups if g.title == "engine options")
    return group._group_actions


def leaf_fields(config=DEFAULTS, prefix=()) -> dict[tuple[str, ...], object]:
    """(path, value) of every field of config, a nested config's fields by their path."""
    leaves = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            leaves.update(leaf_fields(value, (*prefix, f.name)))
        else:
            leaves[(*prefix, f.name)] = value
    return leaves


def other_value(action) -> list[str]:
    """Command-line words giving action a value other than its default."""
    option = action.option_strings[0]
    if action.nargs == 0:  # a switch
        return [option]
    if action.choices:
        return [option, next(c for c in action.choices if c != action.default)]
    if action.type is int:
        return [option, str((action.default or 63) + 1)]
    if action.type is float:
        return [option, str(action.default / 2)]
    return [option, "some/other-model"]


def changed_fields(argv: list[str]) -> set[tuple[str, ...]]:
    config = EngineConfig.from_cli_args(engine_parser().parse_args(argv))
    now = leaf_fields(config)
    return {path for path, value in leaf_fields().items() if now[path] != value}


def test_every_field_has_a_flag_that_sets_it():
    refusable = {("parallel", "data_parallel_size")}  # only 1 runs in one engine
    reached, refused = set(), set()
    for action in engine_actions(engine_parser()):
        if action.nargs == 0 and action.const == action.default:
            continue  # --enable-prefix-caching restates its default; --no-prefix-caching sets it
        argv = other_value(action)
        try:
            changed = changed_fields(argv)
        except ValueError as e:  # the data-parallel size: only 1 runs
            assert "is not supported yet" in str(e), argv
            refused.add(("parallel", action.dest))
            continue
        assert len(changed) == 1, (argv, changed)  # one flag, one field
        reached |= changed
    assert reached == set(leaf_fields()) - refusable
    assert refused == refusable


def test_defaults_are_the_dataclasses():
    assert EngineConfig.from_cli_args(engine_parser().parse_args([])) == DEFAULTS
    by_dest = {a.dest: a for a in engine_actions(engine_parser()) if a.option_strings}
    for path, value in leaf_fields().items():
        name = "engine_seed" if path == ("seed",) else path[-1]  # --engine-seed: see the field
        cli_value = value.value if isinstance(value, LoadFormat) else value
        assert by_dest[name].default == cli_value, path
        if by_dest[name].nargs != 0:  # a switch says only when it is on by default
            assert "(default: " in by_dest[name].help, path


@pytest.mark.parametrize("argv, message", [
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1, got 0"),
    (["--max-num-batched-tokens", "-4"], "--max-num-batched-tokens must be at least 1, got -4"),
    (["--max-model-len", "1"], "--max-model-len must be at least 2, got 1"),
    (["--block-size", "0"], "--block-size must be at least 1, got 0"),
    (["--cpu-kv-cache-gib", "0"], "--cpu-kv-cache-gib must be > 0, got 0.0"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1], got 1.5"),
    (["-tp", "0"], "--tensor-parallel-size must be at least 1, got 0"),
    (["--data-parallel-size", "4"],
     "--data-parallel-size must be 1 (data parallelism is not supported yet), got 4"),
])
def test_bad_values_name_their_flag(argv, message):
    with pytest.raises(ValueError) as info:
        EngineConfig.from_cli_args(engine_parser().parse_args(argv))
    assert str(info.value) == message


@pytest.mark.parametrize("argv", [
    ["--dtype", "int3"], ["--device", "tpu"], ["--load-format", "npz"], ["--max-num-seqs", "many"],
    ["--enable-prefix-caching", "--no-prefix-caching"],
])
def test_unparsable_values_are_usage_errors(argv):
    with pytest.raises(UsageError) as info:
        engine_parser().parse_args(argv)
    assert "\n" not in str(info.value)


def test_the_python_api_checks_the_same_values_naming_the_field():
    with pytest.raises(ValueError, match=r"^max_num_seqs must be at least 1, got 0$"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"^gpu_memory_utilization must be in \(0, 1\], got 2$"):
        CacheConfig(gpu_memory_utilization=2)
    with pytest.raises(ValueError, match=r"^tensor_parallel_size must be at least 1, got 0$"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="data parallelism is not supported yet"):
        EngineConfig.from_fields(data_parallel_size=8)
    assert ParallelConfig() == ParallelConfig(tensor_parallel_size=1, data_parallel_size=1)
    assert EngineConfig.from_fields(tensor_parallel_size=8).parallel.tensor_parallel_size == 8


def test_flat_settings_go_to_the_config_that_declares_them():
    config = EngineConfig.from_fields(model="m", max_num_seqs=3, block_size=4,
                                      tensor_parallel_size=1, load_format="random")
    assert (config.model, config.max_num_seqs, config.load_format) == ("m", 3, LoadFormat.RANDOM)
    assert config.cache == CacheConfig(block_size=4)
    assert config.parallel == ParallelConfig()
    with pytest.raises(TypeError, match="unknown arguments: blocksize, cache"):
        EngineConfig.from_fields(blocksize=4, cache=CacheConfig())
    with pytest.raises(ValueError, match="unknown load_format 'npz'; choose one of: auto, random"):
        EngineConfig.from_fields(load_format="npz")


def test_llm_takes_parallel_sizes_and_refuses_others_before_loading(tmp_path):
    from fastgen import LLM

    missing = str(tmp_path / "no-model")  # never read: each call fails before loading
    with pytest.raises(ValueError, match="data_parallel_size must be 1 .*not supported yet"):
        LLM(missing, data_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1, got 0"):
        LLM(missing, tensor_parallel_size=0)
    with pytest.raises(TypeError, match="LLM\\(\\) got unknown arguments: tp"):
        LLM(missing, tp=2)
