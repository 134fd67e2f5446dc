"""GGUF files of every architecture fastgen reads (llama, qwen2, qwen3; Llama 3.1's rope_freqs;
the mixture-of-experts qwen3moe, qwen2moe with its shared expert, and Mixtral as llama with experts),
written in the test from tiny random transformers models the way llama.cpp's converter writes
them (its tensor names, its q/k row permutation for llama, its metadata keys, the default
model's tokenizer), with the gguf package's own quantizers. fastgen runs each file on its
quantized blocks and is checked against transformers running the original model with the
weights the file holds (dequantized by gguf): logits within the quantized path's tolerance and
the same greedy tokens. So the metadata -> config mapping (rope scaling included), the names and
the permutation are checked against an oracle that never read the file."""

from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from fastgen import quantization
from fastgen.config import EngineConfig
from fastgen.loader import ModelLoadError, load_model
from fastgen.loader.gguf import _GLOBAL_NAMES, _LAYER_NAMES, _MOE_NAMES, llama3_factors
from fastgen.loader.hub import SOURCE_GGUF, default_model_dir
from fastgen.ops.tolerances import QUANT_LOGIT_TOLERANCES
from transformers import (AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2Config,
                          Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)

from tests.models.harness import hf_greedy, paged_logits, randomized

VOCAB = 49152  # the default model's tokenizer, copied into every file
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2)
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}

CASES = {
    "llama_q8_0": ("llama", LlamaConfig(**SMALL, tie_word_embeddings=True), "Q8_0"),
    "llama31_rope_freqs_q4_0": ("llama", LlamaConfig(**SMALL, head_dim=32, rope_parameters=LLAMA31_ROPE,
                                                     tie_word_embeddings=False), "Q4_0"),
    "qwen2_q4_1": ("qwen2", Qwen2Config(**SMALL, tie_word_embeddings=True), "Q4_1"),
    "qwen3_q8_0": ("qwen3", Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=False), "Q8_0"),
    "qwen3moe_q8_0": ("qwen3moe", Qwen3MoeConfig(**SMALL, head_dim=16, moe_intermediate_size=32,
                                                 num_experts=4, num_experts_per_tok=2,
                                                 norm_topk_prob=True, tie_word_embeddings=False),
                      "Q8_0"),
    "qwen2moe_q4_1": ("qwen2moe", Qwen2MoeConfig(**SMALL, moe_intermediate_size=32,
                                                 shared_expert_intermediate_size=64, num_experts=4,
                                                 num_experts_per_tok=2, norm_topk_prob=False,
                                                 tie_word_embeddings=True), "Q4_1"),
    "mixtral_q4_0": ("llama", MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2,
                                            tie_word_embeddings=False), "Q4_0"),
}
_TO_GGUF = {**{hf: g for g, hf in _GLOBAL_NAMES.items()}, **{hf: g for g, hf in _LAYER_NAMES.items()},
            **{hf: g for g, hf in _MOE_NAMES.items() if "{e}" not in hf}}


def gguf_name(hf: str) -> str:
    base, _, suffix = hf.rpartition(".")
    if base in _TO_GGUF:
        return f"{_TO_GGUF[base]}.{suffix}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}.{suffix}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute() of q / k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str, model, qtype: str) -> dict[str, torch.Tensor]:
    """model as a GGUF of arch with its matrices in qtype; returns the weights the file holds,
    dequantized, by Hugging Face name (before llama's permutation)."""
    config = model.config
    source = gguf.GGUFReader(default_model_dir() / SOURCE_GGUF)
    field = lambda key: source.fields[key].contents()  # noqa: E731
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if arch in ("qwen3", "qwen3moe"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if arch != "llama":
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if arch == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_tokenizer_model(field("tokenizer.ggml.model"))
    writer.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    writer.add_token_list(field("tokenizer.ggml.tokens"))
    writer.add_token_types(field("tokenizer.ggml.token_type"))
    writer.add_token_merges(field("tokenizer.ggml.merges"))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(field("tokenizer.chat_template"))
    held = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            values = permute(values, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            values = permute(values, config.num_key_value_heads)
        kind = gguf.GGMLQuantizationType[qtype]
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: llama.cpp's gate and up [E, I, H]
            half = values.shape[1] // 2
            stored = []
            for part, gguf_part in ((values[:, :half], "ffn_gate_exps"), (values[:, half:], "ffn_up_exps")):
                data = gguf.quants.quantize(np.ascontiguousarray(part), kind)
                writer.add_tensor(f"blk.{layer}.{gguf_part}.weight", data, raw_dtype=kind)
                stored.append(gguf.quants.dequantize(data, kind))
            held[name] = torch.from_numpy(np.concatenate(stored, axis=1))
            continue
        if name.endswith("experts.down_proj"):
            data = gguf.quants.quantize(values, kind)
            writer.add_tensor(f"blk.{layer}.ffn_down_exps.weight", data, raw_dtype=kind)
            held[name] = torch.from_numpy(gguf.quants.dequantize(data, kind))
            continue
        if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):  # routers stay F32,
            if values.shape[0] == 1:                                        # as llama.cpp keeps them
                values = values[0]  # the shared-expert gate: [H]
            writer.add_tensor(gguf_name(name), values)
            held[name] = torch.from_numpy(values).reshape(tensor.shape)
            continue
        if values.ndim == 2 and values.shape[1] % 32 == 0:
            data = gguf.quants.quantize(values, kind)
            writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
            stored = gguf.quants.dequantize(data, kind)
        else:
            writer.add_tensor(gguf_name(name), values)
            stored = values
        held[name] = torch.from_numpy(np.ascontiguousarray(stored))
    if config.rope_parameters["rope_type"] == "llama3":  # as llama.cpp writes Llama 3.1's
        p = config.rope_parameters
        inv = 1.0 / p["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
        freqs = llama3_factors(inv, p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                               p["original_max_position_embeddings"]).astype(np.float32)
        writer.add_tensor("rope_freqs.weight", freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if arch == "llama":  # the oracle gets Hugging Face's row order back
        for name in held:
            heads = (config.num_attention_heads if ".q_proj." in name else
                     config.num_key_value_heads if ".k_proj." in name else None)
            if heads:
                n = held[name].shape[0]
                held[name] = held[name].reshape(heads, n // heads // 2, 2, -1).swapaxes(1, 2).reshape(n, -1)
    return held


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_file_runs_quantized_like_transformers(tmp_path, case):
    arch, config, qtype = CASES[case]
    torch.manual_seed(0)
    model = randomized(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()
    path = tmp_path / f"{case}.gguf"
    held = write_gguf(path, arch, model, qtype)
    model.load_state_dict(held, strict=False)  # the oracle runs the weights the file holds

    loaded = load_model(EngineConfig(model=str(path), dtype="float32", device="cpu"))
    assert loaded.quantization == "gguf"
    assert type(loaded.hf_config) is type(config)
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj.weight
    assert isinstance(qkv, quantization.QuantizedParameter)
    assert [s.name for s in qkv.packed.segments] == [qtype]
    if config.rope_parameters["rope_type"] == "llama3":
        # the file keeps the divisors, not the parameters: any that give them are the same rotary
        got = loaded.hf_config.rope_parameters
        assert (got["rope_type"], got["factor"]) == ("llama3", 8.0)
        inv = 1.0 / 500000.0 ** (np.arange(0, 32, 2) / 32)
        assert np.allclose(llama3_factors(inv, 8.0, got["low_freq_factor"], got["high_freq_factor"],
                                          got["original_max_position_embeddings"]),
                           llama3_factors(inv, 8.0, 1.0, 4.0, 64))

    if experts := getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        moe = loaded.model.model.layers[0].mlp.experts  # each expert on its quantized blocks
        for weight in (moe.w13, moe.w2):
            assert isinstance(weight, quantization.QuantizedExperts)
            assert len(weight.experts) == experts
            assert {seg.name for e in weight.experts for seg in e.packed.segments} == {qtype}
            assert weight.stacked.shape[0] == experts  # one quant_fused_moe call per layer

    prompt = torch.randint(0, VOCAB, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    tokens, expected = hf_greedy(model, prompt, 6)
    ours = paged_logits(loaded.model, prompt, tokens)
    torch.testing.assert_close(ours, expected[:-1], **QUANT_LOGIT_TOLERANCES[qtype])
    assert ours[len(prompt) - 1:].argmax(-1).tolist() == tokens


def test_rope_freqs_that_are_no_llama3_scaling_are_refused(tmp_path):
    from fastgen.loader.gguf import llama3_rope_parameters

    inv = 1.0 / 500000.0 ** (np.arange(0, 32, 2) / 32)
    good = llama3_factors(inv, 8.0, 1.0, 4.0, 8192)
    params = llama3_rope_parameters(good, 500000.0, 32, 8192, tmp_path / "x.gguf")
    assert np.allclose(llama3_factors(inv, params["factor"], params["low_freq_factor"],
                                      params["high_freq_factor"], 8192), good)
    bad = good.copy()
    bad[3] = 2.5  # not monotone in the wavelength
    with pytest.raises(ModelLoadError, match="not a Llama 3 rope scaling"):
        llama3_rope_parameters(bad, 500000.0, 32, 8192, tmp_path / "x.gguf")
