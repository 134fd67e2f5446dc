"""--quantization int8 (weight-only, one scale per output channel) on a Hugging Face checkpoint:
every linear layer's weight is quantized at load into the Q8_0 kernel layout; the embedding and
LM head stay in the checkpoint's dtype. Checked against transformers running the same checkpoint
with each linear weight replaced by its int8 dequantization (the oracle sees the same weights,
computed its own way), within the quantized path's logit tolerance, and with the same greedy
tokens."""

import torch
from fastgen import quantization
from fastgen.config import EngineConfig
from fastgen.loader import load_model
from fastgen.ops.tolerances import QUANT_LOGIT_TOLERANCES
from fastgen.quantization.formats import quantize_int8_per_channel
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

from tests.models.harness import (
    VOCAB,
    PagedHarness,
    hf_greedy,
    paged_logits,
    save_tiny_model,
)

CONFIG = LlamaConfig(hidden_size=192, intermediate_size=320, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                     tie_word_embeddings=False, attention_bias=True)


def test_int8_matches_transformers_on_the_dequantized_weights(tmp_path):
    save_tiny_model(CONFIG, tmp_path)
    loaded = load_model(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu",
                                     quantization="int8"))
    assert loaded.quantization == "int8"
    layer = loaded.model.model.layers[1]
    for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                 layer.mlp.down_proj):
        assert isinstance(proj.weight, quantization.QuantizedParameter)
        assert [s.name for s in proj.weight.packed.segments] == ["Q8_0"]
    assert not isinstance(loaded.model.lm_head.weight, quantization.QuantizedParameter)

    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    with torch.no_grad():
        for name, module in hf_model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                _, decoded = quantize_int8_per_channel(module.weight)
                module.weight.copy_(decoded.dequantize())
    prompt = torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(3)).tolist()
    tokens, expected = hf_greedy(hf_model, prompt, 8)
    ours = paged_logits(loaded.model, prompt, tokens)
    torch.testing.assert_close(ours, expected[:-1], **QUANT_LOGIT_TOLERANCES["Q8_0"])
    assert ours[len(prompt) - 1:].argmax(-1).tolist() == tokens


def test_int8_with_random_weights_builds(tmp_path):
    save_tiny_model(CONFIG, tmp_path)
    loaded = load_model(EngineConfig(model=str(tmp_path), dtype="bfloat16", device="cpu",
                                     quantization="int8", load_format="random"))
    harness = PagedHarness(loaded.model, max_seqs=1, max_len=8, dtype=torch.bfloat16)
    assert torch.isfinite(harness.prefill([[3, 4, 5]])[0]).all()


MOE = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     moe_intermediate_size=96, num_experts=6, num_experts_per_tok=2,
                     norm_topk_prob=True, tie_word_embeddings=False)


def test_int8_experts_of_a_moe_checkpoint_match_transformers(tmp_path):
    """Every expert's gate, up and down quantized per output channel, packed and stacked, and run
    through the quantized kernels (ops.quant_fused_moe); the router stays float."""
    save_tiny_model(MOE, tmp_path)
    loaded = load_model(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu",
                                     quantization="int8"))
    moe = loaded.model.model.layers[0].mlp
    for weight in (moe.experts.w13, moe.experts.w2):
        assert isinstance(weight, quantization.QuantizedExperts) and len(weight.experts) == 6
        assert {s.name for e in weight.experts for s in e.packed.segments} == {"Q8_0"}
        assert weight.stacked_qtype == 8 and weight.stacked.shape[0] == 6  # quant_fused_moe's
    assert not isinstance(moe.gate.weight, quantization.QuantizedParameter)

    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                    attn_implementation="eager").eval()

    def int8(rows: torch.Tensor) -> torch.Tensor:
        return quantize_int8_per_channel(rows)[1].dequantize()

    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, out, in]
                param.copy_(torch.stack([int8(expert) for expert in param]))
            elif param.dim() == 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight",
                                                          "mlp.gate.weight")):
                param.copy_(int8(param))  # the linear layers
    prompt = torch.randint(0, VOCAB, (19,), generator=torch.Generator().manual_seed(4)).tolist()
    tokens, expected = hf_greedy(hf_model, prompt, 8)
    ours = paged_logits(loaded.model, prompt, tokens)
    torch.testing.assert_close(ours, expected[:-1], **QUANT_LOGIT_TOLERANCES["Q8_0"])
    assert ours[len(prompt) - 1:].argmax(-1).tolist() == tokens
