"""Fixtures of the generation job's tests: the tiny Llama (built once per session) and small
parquet files shaped like verl's GSM8K data."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.engine.tiny_model import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-generation"))


def gsm8k_table(rows: int) -> pa.Table:
    """verl's GSM8K columns: a chat prompt, and nested columns that must come back unchanged."""
    return pa.table({
        "data_source": ["openai/gsm8k"] * rows,
        "prompt": [[{"role": "user", "content": f"What is {i} plus {i}? Let's think step by step."}]
                   for i in range(rows)],
        "ability": ["math"] * rows,
        "reward_model": [{"style": "rule", "ground_truth": str(2 * i)} for i in range(rows)],
        "extra_info": [{"split": "test", "index": i} for i in range(rows)],
    })


def write_parquet(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


def job_args(model: Path, data: Path, output: Path, **keys) -> list[str]:
    """A fastgen-generate command line on the tiny model (float32, CPU, a small cache)."""
    values = {"model.path": model, "data.path": data, "data.output_path": output,
              "rollout.dtype": "float32", "trainer.device": "cpu",
              "rollout.cpu_kv_cache_gib": 0.01, "data.n_samples": 2,
              "rollout.response_length": 8, "rollout.prompt_length": 64, "data.batch_size": 4,
              **keys}
    return [f"{k}={v}" for k, v in values.items()]
