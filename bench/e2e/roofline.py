"""What the roofline benchmarks (bench_decode.py, bench_prefill.py) share: the cost of a model
step from the model's shapes, their prompts, and the skeleton of a run, which records what ran
where (bench.common.run_metadata), runs on a real model or a synthetic preset (presets.py), and
writes its results to --json after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import run_metadata, save_json
from bench.e2e.presets import SYNTHETIC_MODELS, synthetic_model_dir


@dataclass
class StepCost:
    """What one decode step over a batch must read and compute, from the model's shapes. A
    "key" is one cached position one sequence attends to; a step's keys are summed over its
    sequences.

    A mixture-of-experts layer reads only the experts its tokens were routed to: with k of E
    experts per token and routing spread evenly, a batch of B tokens reaches a fraction
    1 - (1 - k/E)^B of them (the expected share of experts at least one token picks), so
    expert bytes are counted at that fraction and expert FLOPs at k/E of the experts' weights."""

    weight_bytes: int        # every weight but the embedding table and the experts; the LM head
    row_bytes: int           # one embedding row: each sequence gathers one
    matmul_weights: int      # weights multiplied per token: every linear layer, the LM head and
    #                          k experts of each MoE layer
    kv_bytes_per_key: int    # 2 * layers * kv_heads * head_dim * dtype bytes
    flops_per_key: int       # 4 * layers * heads * head_dim: q.k and p.v
    expert_bytes: int = 0    # every MoE layer's experts, all E of them
    experts: int = 0         # E
    experts_per_token: int = 0  # k
    # MLA (DeepSeek): a key is one latent row, kv_bytes_per_key = layers * (L + R) * dtype bytes,
    # flops_per_key = 2 * layers * heads * (2L + R); kv_b_proj's weights stand for the absorbed
    # W_UK / W_UV products (the same count).

    @classmethod
    def of(cls, model: torch.nn.Module, hf_config) -> StepCost:
        params = dict(model.named_parameters())  # a tied LM head appears once, as the embedding
        elem = next(iter(params.values())).element_size()
        embedding = next(p for name, p in params.items() if "embed_tokens" in name)  # [V, H]
        table = 0 if getattr(hf_config, "tie_word_embeddings", False) else embedding.numel()
        experts = [p for name, p in params.items() if ".experts." in name]  # w13, w2: [E, ., .]
        expert_params = sum(p.numel() for p in experts)
        num_experts = experts[0].shape[0] if experts else 0
        top_k = int(getattr(hf_config, "num_experts_per_tok", 0)) if experts else 0
        total = sum(p.numel() for p in params.values()) - expert_params
        vectors = sum(p.numel() for p in params.values() if p.dim() == 1)  # norms, biases
        layers, heads = hf_config.num_hidden_layers, hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        active_params = expert_params * top_k // num_experts if experts else 0
        kv_bytes_per_key = 2 * layers * hf_config.num_key_value_heads * head_dim * elem
        flops_per_key = 4 * layers * heads * head_dim
        latent = getattr(hf_config, "kv_lora_rank", None)
        if latent:  # MLA: one [L + R] row per key, read as each head's key (L + R) and value (L)
            rope = hf_config.qk_rope_head_dim
            kv_bytes_per_key = layers * (latent + rope) * elem
            flops_per_key = 2 * layers * heads * (2 * latent + rope)
        return cls(weight_bytes=(total - table) * elem, row_bytes=embedding.shape[1] * elem,
                   matmul_weights=total - vectors - table + active_params,
                   kv_bytes_per_key=kv_bytes_per_key, flops_per_key=flops_per_key,
                   expert_bytes=expert_params * elem, experts=num_experts,
                   experts_per_token=top_k)

    def experts_read(self, batch: int) -> float:
        """The expected fraction of each MoE layer's experts a batch of tokens reaches."""
        if not self.experts:
            return 0.0
        return 1.0 - (1.0 - self.experts_per_token / self.experts) ** batch

    def bytes(self, batch: int, keys: float) -> float:
        return (self.weight_bytes + self.expert_bytes * self.experts_read(batch)
                + batch * self.row_bytes + keys * self.kv_bytes_per_key)

    def flops(self, batch: int, keys: float) -> float:
        return 2 * self.matmul_weights * batch + keys * self.flops_per_key


def random_prompts(batch: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).tolist()


def run_and_save(args, run, **description) -> dict:
    """A roofline benchmark's results: what was run where, when and with which versions, then
    `description`, then what run(args, model, load_format, results, save) adds to them, model
    being a folder written for a SYNTHETIC_MODELS preset, and save() writing them to --json."""
    load_format = "random" if args.model in SYNTHETIC_MODELS else args.load_format
    results = {"model": args.model, "weights": "random" if load_format == "random" else "real",
               "dtype": args.dtype, "device": args.device, **run_metadata(args.device),
               **description}

    def save() -> None:
        if args.json:
            save_json(args.json, results)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastgen-bench-") as folder:
        model = args.model
        if model in SYNTHETIC_MODELS:
            model = str(synthetic_model_dir(SYNTHETIC_MODELS[model], Path(folder)))
        run(args, model, load_format, results, save)
    results["wall_s"] = time.perf_counter() - start
    save()
    return results


def describe_run(results: dict) -> str:
    """run_and_save's description of the run in one line, a table's first."""
    return (f"model {results['model']} ({results['weights']} weights, {results['dtype']})  "
            f"device {results['device_name']}  {results['date']}  commit {results['commit']}")
