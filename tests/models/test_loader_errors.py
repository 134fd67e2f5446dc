"""Every way a user can point fastgen at a bad model ends in a ModelLoadError with a message that
names the problem, never a traceback from deep inside transformers or safetensors."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from fastgen.config import EngineConfig, LoadFormat
from fastgen.loader import ModelLoadError, load_model
from fastgen.loader.hub import PRESETS
from tests.models.harness import save_tiny_model

TINY = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)


def load(model, **kwargs):
    return load_model(EngineConfig(model=str(model), dtype="float32", device="cpu", **kwargs))


@pytest.fixture
def tiny_dir(tmp_path):
    save_tiny_model(TINY, tmp_path)
    return tmp_path


def test_unknown_name():
    with pytest.raises(ModelLoadError, match=r"unknown model 'no-such-model'.*preset: smollm2"):
        load("no-such-model")


def test_unreachable_hub_fails_fast():
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="could not download fastgen-test/does-not-exist"):
        load("fastgen-test/does-not-exist")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("preset", ["mixtral", "qwen2.5", "qwen3", "qwen3-moe", "llama4-scout",
                                    "deepseek-v2-lite"])
def test_presets_name_their_checkpoint_when_the_hub_is_unreachable(preset):
    with pytest.raises(ModelLoadError, match=f"could not download {PRESETS[preset]} from"):
        load(preset)


def test_missing_safetensors(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights in"):
        load(tiny_dir)


def test_missing_shard(tiny_dir):
    (tiny_dir / "model.safetensors").rename(tiny_dir / "model-00001-of-00002.safetensors")
    weight_map = {"lm_head.weight": "model-00002-of-00002.safetensors"}
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors .* is missing"):
        load(tiny_dir)


def test_corrupt_safetensors(tiny_dir):
    path = tiny_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot read safetensors file .*model.safetensors"):
        load(tiny_dir)


def test_missing_and_unexpected_weights(tiny_dir):
    path = tiny_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(ModelLoadError, match=r"unexpected weights: model.layers.1.mlp.extra.weight; "
                                             r"missing weights: model.layers.1.mlp.up_proj.weight"):
        load(tiny_dir)


def test_wrong_shape(tiny_dir):
    path = tiny_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, path)
    with pytest.raises(ModelLoadError, match="weight model.layers.0.self_attn.k_proj.weight: "):
        load(tiny_dir)


def test_unsupported_architecture(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"unsupported model architecture \(FancyForCausalLM\); "
                                             r"fastgen supports: LlamaForCausalLM, MistralForCausalLM"):
        load(tiny_dir)


def test_unknown_dtype_and_device(tiny_dir):
    with pytest.raises(ModelLoadError, match="unknown dtype 'int3'"):
        load_model(EngineConfig(model=str(tiny_dir), dtype="int3", device="cpu"))
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        load_model(EngineConfig(model=str(tiny_dir), dtype="float32", device="tpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_unavailable(tiny_dir):
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_model(EngineConfig(model=str(tiny_dir), dtype="float32", device="cuda"))


def test_random_weights_are_seeded_and_skip_the_checkpoint(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    first = load(tiny_dir, load_format=LoadFormat.RANDOM, seed=3).model
    second = load(tiny_dir, load_format=LoadFormat.RANDOM, seed=3).model
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(first.model.norm.weight, torch.ones(64))
    assert 0.015 < first.model.layers[0].mlp.down_proj.weight.std() < 0.025
