"""The job's config: verl's dotted keys (and Hydra's +key), plain flags, a YAML file under both,
verl keys fastgen ignores, and one-line errors naming unknown keys and bad values."""

import pytest

from fastgen.entrypoints.cli import UsageError
from fastgen.entrypoints.generate import parse
from fastgen.generation.config import ConfigError
from fastgen.generation.distributed import Layout, layout_from_env

REQUIRED = ["data.path=in.parquet", "data.output_path=out.parquet"]


def test_verl_command_line_keys():
    config = parse([*REQUIRED, "data.n_samples=3", "model.path=some/model", "rollout.top_k=-1",
                    "rollout.top_p=1.0", "rollout.temperature=0.6", "+model.trust_remote_code=True",
                    "rollout.prompt_length=2048", "rollout.response_length=1024",
                    "rollout.gpu_memory_utilization=0.8", "trainer.nnodes=2"])
    assert config["data.n_samples"] == 3
    assert config["model.path"] == "some/model"
    assert config.top_k is None and config.top_p is None
    assert config.temperature == 0.6
    assert config["rollout.prompt_length"] == 2048
    assert config["rollout.gpu_memory_utilization"] == 0.8
    assert config["trainer.nnodes"] == 2
    assert config.ignored == ["model.trust_remote_code"]


def test_defaults_are_verls():
    config = parse(REQUIRED)
    assert (config["data.n_samples"], config["data.batch_size"], config["data.prompt_key"]) == \
        (5, 128, "prompt")
    assert (config.temperature, config.top_k, config.top_p) == (1.0, 50, 0.7)
    assert (config["rollout.prompt_length"], config["rollout.response_length"]) == (1536, 512)


def test_flags_and_yaml_file(tmp_path):
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("data:\n  path: in.parquet\n  n_samples: 4\n  output_path: o.parquet\n"
                         "rollout:\n  top_k: 20\n  do_sample: false\n"
                         "actor:\n  strategy: fsdp\nray_init:\n  num_cpus: null\n")
    config = parse(["--config", str(yaml_file), "--n-samples", "6", "--save-details",
                    "rollout.top_k=10"])
    assert config["data.path"] == "in.parquet"
    assert config["data.n_samples"] == 6             # a flag beats the file
    assert config.top_k == 10                        # and so does a dotted key
    assert config["data.save_details"] is True
    assert config.temperature == 0.0                 # do_sample: false is greedy
    assert config.ignored == ["actor.strategy", "ray_init.num_cpus"]


def test_enforce_eager_is_a_key_not_an_ignored_one():
    assert parse(REQUIRED)["rollout.enforce_eager"] is False
    config = parse([*REQUIRED, "rollout.enforce_eager=True"])
    assert config["rollout.enforce_eager"] is True and config.ignored == []
    assert parse([*REQUIRED, "--enforce-eager"])["rollout.enforce_eager"] is True


def test_flag_values_holding_equals_signs_are_not_keys():
    config = parse(["--data", "dir/a=b.parquet", "--output", "out.parquet"])
    assert config["data.path"] == "dir/a=b.parquet"


@pytest.mark.parametrize("argv, message", [
    (["data.nsamples=3", "rollout.tempreature=1"],
     "unknown config keys: data.nsamples, rollout.tempreature"),
    (["rollout.top_k=many"], "rollout.top_k: expected int, got 'many'"),
    (["data.truncation=middle"], "data.truncation: expected one of left, right, reject, error"),
    (["data.n_samples=0"], "data.n_samples must be at least 1"),
    (["rollout.top_p=1.5"], "rollout.top_p must be in (0, 1]"),
    (["--top-k", "x"], "argument --top-k: invalid int value"),
])
def test_bad_keys_and_values_name_them(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse([*REQUIRED, *argv])


def test_required_keys():
    with pytest.raises(UsageError, match=r"data.output_path is required \(--output"):
        parse(["data.path=x.parquet"])


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UsageError, match="is not valid YAML") as info:
        parse(["--config", str(bad), *REQUIRED])
    assert "\n" not in str(info.value)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UsageError, match="must hold a mapping"):
        parse(["--config", str(tmp_path / "list.yaml"), *REQUIRED])
    with pytest.raises(UsageError, match="cannot read config file"):
        parse(["--config", str(tmp_path / "missing.yaml"), *REQUIRED])


def test_layout_shards_rows_contiguously_by_data_parallel_group(monkeypatch):
    shards = [Layout(rank=r, world_size=3).shard(10) for r in range(3)]
    assert [list(s) for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    layout = Layout(rank=5, world_size=8, tp_size=2)
    assert (layout.dp_size, layout.dp_rank, layout.tp_rank) == (4, 2, 1)
    assert layout.shard(10) == Layout(rank=4, world_size=8, tp_size=2).shard(10) == range(6, 8)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert layout_from_env(2) == Layout(rank=3, world_size=4, tp_size=2)
    with pytest.raises(ConfigError, match="world size 4 is not a multiple of "
                                          "rollout.tensor_model_parallel_size=3"):
        layout_from_env(3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert layout_from_env(2) == Layout()  # one process: its engine starts its workers itself
