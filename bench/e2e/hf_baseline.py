"""Hugging Face transformers as the end-to-end benchmarks' baseline: the same model, dtype and
device as fastgen, in the same process.

Two loaders, because the benchmarks run two kinds of baseline. `HFRunner` is generate over
left-padded batches, as users run it (bench_e2e.py, bench_offline.py). `load_hf` only loads a
model, initialised where it runs (no host copy of 16 GB first), for benchmarks that time its
steps themselves (bench_decode.py, bench_prefill.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastgen.config import DTYPES


class HFRunner:
    """generate over left-padded batches, greedy, exactly max_tokens new tokens per row."""

    def __init__(self, args, model_dir, tokenizer):
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = DTYPES[args.dtype]
        if args.load_format == "random":  # same shapes, random weights: the speed is the same
            config = AutoConfig.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = self.model.to(args.device).eval()
        self.device = args.device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], max_tokens: int) -> None:
        width = max(len(p) for p in prompt_ids)  # left padding, as batched HF generation needs
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompt_ids],
                           device=self.device)  # [B, width]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids],
                            device=self.device)  # [B, width]
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                  pad_token_id=self.pad)
        assert out.shape[1] == width + max_tokens


def load_hf(model_dir: Path, load_format: str, dtype: torch.dtype, device: str):
    """The model in model_dir on device, in eval mode: its weights, or random ones of the same
    shapes (load_format "random")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "random":
        with torch.device(device):  # initialised where it runs: no host copy of 16 GB first
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()
