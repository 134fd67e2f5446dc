"""fastgen's Llama 4 text model against Hugging Face's on tiny random checkpoints: rotary layers
with interleaved llama3-scaled rotary, 8-token chunked attention and the weightless q/k RMS norm,
a NoPE layer with full attention and temperature tuning (floor_scale 4, so it changes the queries
from position 3 on), MoE layers (sigmoid top-1 on the expert's input, plus the shared expert)
beside dense ones; and the multimodal checkpoint (Llama4ForConditionalGeneration, what Scout
ships) loading its language model alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig

from fastgen.config import EngineConfig
from fastgen.loader import load_model
from fastgen.loader.hf import load_hf_config
from tests.models.harness import VOCAB, assert_matches_hugging_face, save_tiny_model

TEXT = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=5,
            num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=4,
            attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True,
            floor_scale=4, attn_scale=0.1, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64},
            tie_word_embeddings=False)
CASES = {
    "llama4_text": Llama4TextConfig(**TEXT),
    "llama4_every_layer_moe_top2": Llama4TextConfig(**{**TEXT, "interleave_moe_layer_step": 1,
                                                      "num_experts_per_tok": 2}),
}
LENGTHS = [21, 1, 9, 30]  # across chunk boundaries (8, 16, 24)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hugging_face(case, tmp_path, device):
    assert_matches_hugging_face(CASES[case], tmp_path, device, LENGTHS)


def test_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """Llama4ForConditionalGeneration's language_model.* tensors load into the text model (the
    same weights as the text-only checkpoint they came from); vision_model.* and
    multi_modal_projector.* are skipped."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    text_dir, multimodal_dir = tmp_path / "text", tmp_path / "multimodal"
    save_tiny_model(CASES["llama4_text"], text_dir)
    text_config = CASES["llama4_text"].to_dict() | {"vocab_size": VOCAB}
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "image_size": 28, "patch_size": 14,
              "projector_input_dim": 64, "projector_output_dim": 64, "vision_output_dim": 64}
    multimodal = Llama4ForConditionalGeneration(Llama4Config(text_config=text_config,
                                                             vision_config=vision))
    text_only = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
    multimodal.language_model.load_state_dict(text_only.state_dict())
    multimodal.save_pretrained(multimodal_dir)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (multimodal_dir / file).write_text((text_dir / file).read_text())
    with safe_open(multimodal_dir / "model.safetensors", "pt") as f:
        prefixes = {name.split(".")[0] for name in f.keys()}
    assert prefixes == {"language_model", "vision_model", "multi_modal_projector"}

    text = load_model(EngineConfig(model=str(text_dir), dtype="float32", device="cpu"))
    loaded = load_model(EngineConfig(model=str(multimodal_dir), dtype="float32", device="cpu"))
    theirs = dict(loaded.model.named_parameters())
    assert theirs.keys() == dict(text.model.named_parameters()).keys()
    for name, param in text.model.named_parameters():
        assert torch.equal(param, theirs[name]), name


def test_older_scout_configs_with_an_int_temperature_tuning_load(tmp_path):
    save_tiny_model(CASES["llama4_text"], tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["attn_temperature_tuning"] = 4
    path.write_text(json.dumps(config))
    assert load_hf_config(tmp_path).attn_temperature_tuning is True
