"""A tiny, self-contained Llama checkpoint for engine and entrypoint tests: a byte-level BPE
tokenizer trained here on a few sentences (with multi-byte characters, so some characters split
across tokens), a ChatML chat template, and random float32 weights saved with save_pretrained.
No network, a few seconds to build."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Once upon a time there was a small model that answered questions.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000, and punctuation: !?.,;:-()[]{}",
    "Café, naïve, résumé, Straße, 日本語, 中文, Ελληνικά, русский, emoji 🙂🚀",
    "def hello(): return 'world'  # code, too",
]


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (GPT-2 style) wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def save_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """An HF Llama folder (config, safetensors, tokenizer, generation config) at path;
    overrides: LlamaConfig fields to change (head_dim=64 and the like for the CUDA kernels)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                  initializer_range=0.25)
    config = LlamaConfig(**{**fields, **overrides})
    return _save(LlamaForCausalLM, config, tokenizer, path, seed)


def _save(model_class, config, tokenizer, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_deepseek_v2_lite(path: Path, seed: int = 0) -> Path:
    """A DeepSeek-V2-Lite-shaped folder (MLA without q LoRA, yarn, a dense first layer, then
    greedy top-k experts with two shared ones) with the same tokenizer and chat template."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = DeepseekV2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, max_position_embeddings=640,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1},
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.25)
    return _save(DeepseekV2ForCausalLM, config, tokenizer, path, seed)
