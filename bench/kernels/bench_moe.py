"""The grouped expert MLP (fastgen's fused_moe) beside transformers' own expert implementations,
timed in the same run, on Mixtral-, Qwen3-MoE- and Llama-4-Scout-shaped layers (bf16).

    python bench/kernels/bench_moe.py                 # the full run: a few minutes on 2 cores
    python bench/kernels/bench_moe.py --quick         # T = 1, 16, 64: about a minute
    python bench/kernels/bench_moe.py --json moe.json

Decode (T = 1, 4, 16 tokens) is bound by reading the selected experts' weights: each row gives
the GB/s of the ACTIVE experts' weights (3 * H * I per distinct expert the batch routes to) and
its fraction of a copy's bandwidth (read + write bytes per second) measured in the same run.
Prefill (T = 512, 64 with --quick) is compute-bound: TFLOP/s of the routed pairs' 6 * H * I
FLOPs each, beside square bf16 and fp32 matmuls' rates measured in the same run (the fraction is
of the fp32 one: a CPU without bf16 dot products multiplies bf16 through fp32 FMAs). The limits
are measured before and after, and the best kept; the summary reads every row against them.

Baselines, on the same weights: transformers 5.x's eager per-expert loop (MixtralExperts /
Qwen3MoeExperts with experts_implementation "eager": index the expert's tokens, F.linear, SiLU,
F.linear, index_add_) and its grouped_mm path (integrations/moe.py: sort the pairs, one
torch grouped GEMM per projection); for Llama 4, Llama4TextExperts (its only implementation:
every token through every expert by bmm, the router score 0 for the others) beside the same
grouped_mm path on its shapes. Routings are random (softmax top-k renormalised; Llama 4:
sigmoid of the top-1 logit, weight on the input), drawn afresh for each call from a pool of 16, so
that consecutive calls touch different experts and the weights come from memory, not the
32 MiB-class L3. The hidden size is reduced to 1024 so that the three layers (and Llama 4's
transposed baseline copy) fit a small machine; the expert intermediate sizes and expert counts
are the real ones. Every fastgen result is checked first, against transformers' eager one (or,
where that is not run, fastgen.ops.reference).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgen import ops
from fastgen.ops import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import MachineLimits, Timer, check, matmul_tflop_s, run_metadata, save_json

HIDDEN = 1024  # reduced from 4096 (Mixtral), 2048 (Qwen3-30B-A3B), 5120 (Llama-4-Scout)
ROUTINGS = 16  # distinct routings cycled through by the timed calls


@dataclass(frozen=True)
class Layer:
    name: str
    num_experts: int  # E
    top_k: int        # k
    inter: int        # I
    llama4: bool      # sigmoid top-1, weight on the input, Llama4TextExperts as the eager baseline


LAYERS = (
    Layer("Mixtral-8x7B", 8, 2, 14336, False),
    Layer("Qwen3-30B-A3B", 128, 8, 768, False),
    Layer("Llama-4-Scout", 16, 1, 8192, True),
)


def hf_experts(layer: Layer, implementation: str, w13: torch.Tensor, w2: torch.Tensor):
    """transformers' expert module for the layer on fastgen's weights (shared, not copied):
    MixtralExperts / Qwen3MoeExperts with the given experts_implementation."""
    if layer.name.startswith("Mixtral") or layer.llama4:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=layer.inter,
                               num_local_experts=layer.num_experts, num_experts_per_tok=layer.top_k)
        module_cls = MixtralExperts
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        config = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=layer.inter,
                                num_experts=layer.num_experts, num_experts_per_tok=layer.top_k)
        module_cls = Qwen3MoeExperts
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = module_cls(config)
    module.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return module


def hf_llama4_experts(layer: Layer, w13: torch.Tensor, w2: torch.Tensor):
    """Llama4TextExperts with its checkpoint layout ([E, H, 2I] and [E, I, H]: a transposed copy)
    and the routed half of Llama4TextMoe.forward around it: every token, scaled by its router
    score (0 for the experts it is not routed to), through every expert."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    config = Llama4TextConfig(hidden_size=HIDDEN, intermediate_size=layer.inter,
                              num_local_experts=layer.num_experts, num_experts_per_tok=1)
    with torch.device("meta"):
        experts = Llama4TextExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(w13.transpose(1, 2).contiguous(), requires_grad=False)
    experts.down_proj = torch.nn.Parameter(w2.transpose(1, 2).contiguous(), requires_grad=False)

    def forward(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(x.shape[0], layer.num_experts, device=x.device)
        scores = scores.scatter(1, ids.long(), weights).to(x.dtype)  # [T, E]
        routed_in = x.repeat(layer.num_experts, 1) * scores.t().reshape(-1, 1)  # [E * T, H]
        return experts(routed_in).view(layer.num_experts, x.shape[0], -1).sum(0)

    return forward


class Bench:
    def __init__(self, device: str, quick: bool):
        self.device, self.quick = device, quick
        self.timer = Timer(device)
        # torch's square bf16 matmul runs at ~1 GFLOP/s on CPUs without bf16 dot products: 1024^3
        # takes seconds there (2048^3 would take minutes), so 1024 (512 for --quick); the fp32
        # one twice that.
        self.matmul_size = 512 if quick else 1024
        self.limits, self.fp32_matmul_tflop_s = self.measure_limits()
        self.rows: list[dict] = []

    def measure_limits(self) -> tuple[MachineLimits, float]:
        """The copy bandwidth and the bf16 matmul rate, and the fp32 matmul rate (TFLOP/s): CPUs
        without bf16 dot products multiply bf16 through fp32 FMAs, as fastgen does there."""
        limits = MachineLimits.measure(self.device, torch.bfloat16, matmul_size=self.matmul_size,
                                       copy_bytes=(256 if self.quick else 512) << 20)
        return limits, matmul_tflop_s(self.device, torch.float32, 2 * self.matmul_size)

    def routings(self, layer: Layer, tokens: int):
        """ROUTINGS random (weights, ids) pairs for `tokens` tokens, as the layer's router gives."""
        pool = []
        for _ in range(ROUTINGS):
            logits = torch.randn(tokens, layer.num_experts, device=self.device)
            if layer.llama4:
                pool.append(ops.moe_route(logits, 1, scoring="sigmoid"))
            else:
                pool.append(ops.moe_route(logits, layer.top_k, renormalize=True))
        return pool

    def time_s(self, fn) -> float:
        """Seconds per call: one call (the warm-up) decides. Under 20 ms, loops of back-to-back
        calls (Timer.loop_us); slower (prefill, transformers' loops), calls timed alone, the
        median of 3 (1 with --quick)."""
        start = self.timer.now()
        fn()
        if self.timer.now() - start < 0.02:
            return self.timer.loop_us(fn) / 1e6
        times = []
        for _ in range(1 if self.quick else 3):
            start = self.timer.now()
            fn()
            times.append(self.timer.now() - start)
        return statistics.median(times)

    def run_layer(self, layer: Layer, token_counts: list[int]) -> None:
        E, k, H, I = layer.num_experts, layer.top_k, HIDDEN, layer.inter
        w13 = (torch.randn(E, 2 * I, H, device=self.device) / H ** 0.5).bfloat16()
        w2 = (torch.randn(E, H, I, device=self.device) / I ** 0.5).bfloat16()
        expert_bytes = 3 * H * I * w13.element_size()
        baselines = {"hf_grouped_mm": hf_experts(layer, "grouped_mm", w13, w2)}
        if layer.llama4:
            baselines = {"hf_llama4_bmm": hf_llama4_experts(layer, w13, w2), **baselines}
        else:
            baselines = {"hf_eager": hf_experts(layer, "eager", w13, w2), **baselines}
        print(f"\n{layer.name}: E {E}, k {k}, H {H} (reduced), I {I}; "
              f"{expert_bytes / 2**20:.1f} MiB per expert, {E * expert_bytes / 2**30:.2f} GiB in all")
        print(f"{'T':>5} {'active':>7} {'fastgen':>10} {'GB/s':>7} {'GFLOP/s':>8}"
              f"   baselines (time, GB/s, fastgen speedup)")
        for tokens in token_counts:
            pool = self.routings(layer, tokens)
            x = torch.randn(tokens, H, device=self.device).bfloat16()
            cycle = itertools.cycle(pool)

            def fastgen():
                weights, ids = next(cycle)
                return ops.fused_moe(x, w13, w2, weights, ids, weight_on_input=layer.llama4)

            def baseline(fn):
                def call():
                    weights, ids = next(cycle)
                    if fn is baselines.get("hf_llama4_bmm"):
                        return fn(x, weights, ids)
                    return fn(x, ids.long(), weights)
                return call

            # Check on the first routing, against transformers' eager result (Llama 4: its bmm at
            # T = 1), or fastgen.ops.reference (float32) where that is not run.
            weights, ids = pool[0]
            if layer.llama4 and tokens == 1:
                expected = baselines["hf_llama4_bmm"](x, weights, ids)
            elif layer.llama4 or self.quick:
                expected = reference.fused_moe(x, w13, w2, weights, ids, layer.llama4)
            else:
                expected = baselines["hf_eager"](x, ids.long(), weights)
            check(f"{layer.name} T={tokens}",
                  ops.fused_moe(x, w13, w2, weights, ids, weight_on_input=layer.llama4), expected)

            active = sum(ids.unique().numel() for _, ids in pool) / len(pool)  # mean distinct experts
            nbytes = active * expert_bytes
            flops = 6 * tokens * k * H * I
            # Llama4TextExperts runs all E experts on every token (16x the work): at T = 1 of the
            # full run only. --quick times the (slowest) eager loop at T = 1 only.
            skip = set()
            if tokens > 1 or self.quick:
                skip.add("hf_llama4_bmm")
            if tokens > 1 and self.quick:
                skip.add("hf_eager")
            s = self.time_s(fastgen)
            row = dict(layer=layer.name, tokens=tokens, active_experts=active, s=s,
                       gb_s=nbytes / s / 1e9, tflop_s=flops / s / 1e12, baselines={})
            for name, fn in baselines.items():
                if name in skip:
                    continue
                t = self.time_s(baseline(fn))
                row["baselines"][name] = dict(s=t, gb_s=nbytes / t / 1e9, speedup=t / s)
            self.rows.append(row)
            extra = "  ".join(f"{name} {b['s'] * 1e3:.2f} ms {b['gb_s']:.1f} ({b['speedup']:.1f}x)"
                              for name, b in row["baselines"].items())
            if skip & set(baselines):
                extra += f"  ({', '.join(sorted(skip & set(baselines)))}: not timed here)"
            print(f"{tokens:5d} {active:7.1f} {s * 1e3:8.2f}ms {row['gb_s']:7.1f} "
                  f"{row['tflop_s'] * 1e3:8.1f}   {extra}")

    def summary(self) -> None:
        """Every row against the machine's limits: the best of those measured before and after
        (a limit measured while something else held a core would flatter every fraction)."""
        limits, fp32 = self.measure_limits()
        self.limits = self.limits.best(limits)
        self.fp32_matmul_tflop_s = fp32 = max(fp32, self.fp32_matmul_tflop_s)
        copy, bf16 = self.limits.copy_gb_s, self.limits.matmul_tflop_s
        print(f"\nlimits (best of before and after): copy (read + write) {copy:.1f} GB/s; matmul "
              f"bf16 {bf16 * 1e3:.1f} GFLOP/s ({self.matmul_size}^3), fp32 {fp32 * 1e3:.1f} "
              f"({2 * self.matmul_size}^3)")
        print(f"{'layer':<15} {'T':>4} {'GB/s':>6} {'of copy':>8} {'GFLOP/s':>8} {'of fp32 mm':>10}"
              f"   fastgen speedup over transformers")
        for row in self.rows:
            row.update(of_copy=row["gb_s"] / copy, of_bf16_matmul=row["tflop_s"] / bf16,
                       of_fp32_matmul=row["tflop_s"] / fp32)
            speedups = "  ".join(f"{name} {b['speedup']:.1f}x" for name, b in row["baselines"].items())
            print(f"{row['layer']:<15} {row['tokens']:4d} {row['gb_s']:6.1f} {100 * row['of_copy']:7.0f}% "
                  f"{row['tflop_s'] * 1e3:8.1f} {100 * row['of_fp32_matmul']:9.0f}%   {speedups}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="T = 1, 16 and 64 (for prefill), one timed call where slow, the "
                             "eager loop at T = 1 only")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.manual_seed(0)
    meta = run_metadata(args.device)
    print(f"{meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, "
          f"fastgen {meta['commit']}")
    bench = Bench(args.device, args.quick)
    token_counts = [1, 16, 64] if args.quick else [1, 4, 16, 512]
    for layer in LAYERS:
        bench.run_layer(layer, token_counts)
    bench.summary()
    if args.json:
        save_json(args.json, {**meta, "hidden": HIDDEN, "copy_gb_s": bench.limits.copy_gb_s,
                              "bf16_matmul_tflop_s": bench.limits.matmul_tflop_s,
                              "fp32_matmul_tflop_s": bench.fp32_matmul_tflop_s,
                              "rows": bench.rows})


if __name__ == "__main__":
    main()
