"""fastgen's Llama against Hugging Face's, on tiny random checkpoints written by save_pretrained and
read back by fastgen.loader: logits of a packed prefill of prompts of different lengths and of
batched decode steps fed with HF's greedy tokens must match HF's within the logit tolerance, and
the greedy tokens must be the same."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from fastgen.config import EngineConfig
from fastgen.loader import load_model
from fastgen.ops.tolerances import assert_logits_close
from tests.models.harness import PagedHarness

VOCAB = 384
DECODE_STEPS = 5

CASES = {
    # 6 query heads share 2 KV heads; untied head
    "llama": LlamaConfig(hidden_size=192, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                         tie_word_embeddings=False),
    # Llama 3.1 scaling with a short original context, so prompts run well past it
    "llama3_rope_scaling": LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}),
    # a window shorter than every prompt; 5 heads, no grouping
    "mistral_sliding_window": MistralConfig(
        hidden_size=160, intermediate_size=288, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=5, head_dim=32, sliding_window=7, tie_word_embeddings=False),
    # biases everywhere, tied embeddings, head_dim * heads != hidden
    "llama_bias_tied": LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, head_dim=64,
                                   attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
}
PROMPT_LENGTHS = {"llama3_rope_scaling": [150, 97, 211]}
DEFAULT_PROMPT_LENGTHS = [13, 1, 29, 40]


def save_tiny_model(hf_config, folder) -> None:
    """A random checkpoint with every parameter (biases and norm weights too) drawn away from its
    init value, saved as safetensors with a small word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf_config = copy.deepcopy(hf_config)
    hf_config.vocab_size = VOCAB
    hf_config.bos_token_id, hf_config.eos_token_id = 1, 2
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1 if "embed" in name or "lm_head" in name else 0.05)
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w1", eos_token="w2").save_pretrained(folder)


def hf_greedy(hf_model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """HF's greedy continuation and its logits at every position of prompt + continuation."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = hf_model(torch.tensor([ids])).logits[0]
            ids.append(int(logits[-1].argmax()))
        logits = hf_model(torch.tensor([ids])).logits[0]  # [L + steps, V]
    return ids[len(prompt):], logits


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hugging_face(case, tmp_path, device):
    hf_config = CASES[case]
    save_tiny_model(hf_config, tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    loaded = load_model(EngineConfig(model=str(tmp_path), dtype="float32", device=device))
    assert loaded.eos_token_ids == [2]

    lengths = PROMPT_LENGTHS.get(case, DEFAULT_PROMPT_LENGTHS)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    expected = [hf_greedy(hf_model, p, DECODE_STEPS) for p in prompts]

    harness = PagedHarness(loaded.model, max_seqs=len(prompts),
                           max_len=max(lengths) + DECODE_STEPS, block_size=16, device=device)
    for prompt, logits, (greedy, hf_logits) in zip(prompts, harness.prefill(prompts), expected):
        assert_logits_close(logits.cpu(), hf_logits[:len(prompt)], torch.float32)
        assert int(logits[-1].argmax()) == greedy[0]
    for step in range(DECODE_STEPS - 1):
        logits = harness.decode([greedy[step] for greedy, _ in expected]).cpu()  # [B, V]
        for b, (prompt, (greedy, hf_logits)) in enumerate(zip(prompts, expected)):
            assert_logits_close(logits[b], hf_logits[len(prompt) + step], torch.float32)
            assert int(logits[b].argmax()) == greedy[step + 1]


def test_tied_head_shares_the_embedding(tmp_path):
    save_tiny_model(CASES["llama_bias_tied"], tmp_path)
    model = load_model(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu")).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
