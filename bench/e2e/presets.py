"""Which model an end-to-end benchmark runs: the model options every one of them takes, and the
synthetic presets `--model` also names in bench_decode.py and bench_prefill.py.

A preset is a real model's config.json run with random weights and a word-level tokenizer over
its ids, so an 8B model's speed can be measured without a download: the prompts are token ids,
and greedy decoding with ignore_eos costs the same whatever the weights say. The tokenizer only
turns outputs into text, but it must know every id: one that decoded to nothing (a smaller
tokenizer's missing ids) would make the detokenizer re-decode an ever longer window.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastgen.config import DEFAULT_MODEL, DTYPES

# meta-llama/Llama-3.1-8B-Instruct's config.json, in the key names both transformers 4 and 5 read.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "initializer_range": 0.02, "torch_dtype": "bfloat16",
}
# Mixtral-8x7B's shape scaled down to fit a 2-core CPU in a benchmark (285M parameters, 115M of
# them active per token: 8 experts, top-2, 6 layers, hidden 768), and Mixtral-8x7B itself for GPUs.
MIXTRAL_MINI = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
    "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6,
    "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000,
    "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
MIXTRAL_8X7B = {**MIXTRAL_MINI, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 128, "max_position_embeddings": 32768}
# deepseek-ai/DeepSeek-V2-Lite-Chat's config.json (15.7B parameters, 2.4B active; 31 GB in bf16,
# more than a 24 GB machine holds), and the same with 4 of its 27 layers (a dense first layer and
# three MoE ones: 2.3B parameters, 4.6 GB) for a CPU benchmark.
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1,
    "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
    "scoring_func": "softmax", "vocab_size": 102400, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 100000,
    "eos_token_id": 100001, "torch_dtype": "bfloat16",
}
# meta-llama/Llama-3.2-1B-Instruct's shape (1.24B parameters, tied embeddings): a model a 2-core
# CPU runs at a few tokens a second, for tensor parallelism on the CPU.
LLAMA32_1B = {**LLAMA31_8B, "hidden_size": 2048, "intermediate_size": 8192,
              "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 64, "rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": 32.0},
              "tie_word_embeddings": True}
SYNTHETIC_MODELS = {  # name -> config.json, run with random weights
    "llama3.1-8b": LLAMA31_8B,
    "llama3.2-1b": LLAMA32_1B,
    "mixtral-mini": MIXTRAL_MINI,
    "mixtral-8x7b": MIXTRAL_8X7B,
    # Mixtral-8x7B's layers, 8 of its 32 (11.7B parameters, 23 GB in bf16): per-layer speed on a
    # GPU without loading 94 GB of random weights.
    "mixtral-8x7b-8l": {**MIXTRAL_8X7B, "num_hidden_layers": 8},
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
    "deepseek-v2-lite-4l": {**DEEPSEEK_V2_LITE, "num_hidden_layers": 4},
}


def model_parser(description: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser with the options every end-to-end benchmark shares: which
    model, in which dtype, on which device, with real or random weights."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--load-format", default="auto", choices=["auto", "random"])
    return parser


def synthetic_model_dir(config: dict, folder: Path) -> Path:
    """A model folder for load_format="random": config.json and a word-level tokenizer whose
    tokens "t0" .. "t{V-1}" cover the config's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    (folder / "config.json").write_text(json.dumps(config, indent=2))
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return folder
