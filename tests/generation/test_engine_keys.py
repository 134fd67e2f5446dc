"""fastgen-generate's verl keys that are engine settings take their flag, type, default, choices and
help from the engine's flag list (fastgen.config.engine_flags), reach the engine's config, and are
checked by the engine's own rules; rollout.tensor_model_parallel_size is ParallelConfig's size."""

import pytest

from fastgen.config import EngineConfig, engine_flags
from fastgen.entrypoints.cli import UsageError
from fastgen.entrypoints.generate import build_parser, parse
from fastgen.generation.config import KEYS

REQUIRED = ["data.path=in.parquet", "data.output_path=out.parquet"]
ENGINE_KEYS = {  # verl's name -> the engine setting
    "model.path": "model", "rollout.dtype": "dtype", "trainer.device": "device",
    "rollout.gpu_memory_utilization": "gpu_memory_utilization",
    "rollout.cpu_kv_cache_gib": "cpu_kv_cache_gib",
    "rollout.tensor_model_parallel_size": "tensor_parallel_size",
    "rollout.max_num_batched_tokens": "max_num_batched_tokens",
    "rollout.max_num_seqs": "max_num_seqs", "rollout.max_model_len": "max_model_len",
    "rollout.enforce_eager": "enforce_eager",
}


def test_engine_keys_are_declared_by_the_engine():
    assert {key.name: key.engine for key in KEYS if key.engine} == ENGINE_KEYS
    flags = engine_flags()
    for key in KEYS:
        if key.engine:
            spec = flags[key.engine]
            assert (key.flag, key.type, key.default, key.help, key.choices) == \
                (spec.option, spec.type, spec.cli_default, spec.flag.help, spec.choices), key.name
    help_text = " ".join(build_parser().format_help().split())
    assert flags["max_num_seqs"].flag.help in help_text
    assert "rollout.max_model_len: context length, prompt plus output, tokens (default: the " \
           "model's)" in help_text


def test_defaults_and_values_reach_the_engine_config():
    assert parse(REQUIRED).engine_config() == EngineConfig()
    config = parse([*REQUIRED, "model.path=m", "rollout.dtype=float32", "trainer.device=cpu",
                    "rollout.gpu_memory_utilization=0.5", "rollout.cpu_kv_cache_gib=0.25",
                    "rollout.tensor_model_parallel_size=1", "--max-num-batched-tokens", "100",
                    "rollout.max_num_seqs=3", "rollout.max_model_len=64",
                    "rollout.enforce_eager=true"]).engine_config()
    assert config == EngineConfig.from_fields(
        model="m", dtype="float32", device="cpu", gpu_memory_utilization=0.5,
        cpu_kv_cache_gib=0.25, tensor_parallel_size=1, max_num_batched_tokens=100,
        max_num_seqs=3, max_model_len=64, enforce_eager=True)


@pytest.mark.parametrize("argv, message", [
    (["rollout.tensor_model_parallel_size=0"],
     "rollout.tensor_model_parallel_size must be at least 1, got 0"),
    (["--tensor-parallel-size", "-1"], "rollout.tensor_model_parallel_size must be at least 1"),
    (["rollout.max_num_seqs=0"], "rollout.max_num_seqs must be at least 1, got 0"),
    (["rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization must be in (0, 1]"),
    (["rollout.dtype=int3"], "rollout.dtype: expected one of bfloat16"),
    (["trainer.device=tpu"], "trainer.device: expected one of auto, cpu, cuda"),
])
def test_engine_values_are_checked_by_the_engines_rules(argv, message):
    with pytest.raises(UsageError) as info:
        parse([*REQUIRED, *argv])
    assert message in str(info.value) and "\n" not in str(info.value)
