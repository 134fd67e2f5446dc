"""End-to-end prefill: time to first token and prefill tokens/s of one long prompt, in fastgen
(chunked, as it runs by default, and in one step) and in Hugging Face transformers (SDPA) on the
same model, with the FLOPs a prefill must cost set against a matmul measured in the same run.

    python bench/e2e/bench_prefill.py --device cuda --model llama3.1-8b --json 8b.json --plot 8b.png
    python bench/e2e/bench_prefill.py --prompt-lens 256,1024 --chunk-tokens 256  # CPU, quick
    python bench/e2e/bench_prefill.py --plot-from 8b.json --plot 8b.png  # the plot, on any machine

`--model llama3.1-8b` is presets.py's preset (Llama-3.1-8B's config, random weights, a
word-level tokenizer over its ids: no download); any other `--model` is what `LLM` takes.
At each prompt length L (default 2048, 8192, 32768; random token ids, one sequence):
- time to first token (TTFT): the median wall time of a call that returns the first token,
  after one untimed warm-up call at that length (a call whose warm-up took longer than
  --long-s is timed once: at that size run-to-run noise is far below what is compared):
  fastgen: LLM.generate with max_tokens=1, greedy, prefix caching off. Twice: with
  max_num_batched_tokens = --chunk-tokens (the engine's default, 2048: a 32k prompt is fed in
  16 steps, each attending to the cache so far) and raised to the longest prompt (one step).
  HF: one forward over the prompt with its KV cache (as generate's prefill), logits of the last
  position only (logits_to_keep=1, else the head over the last hidden state: a [L, vocab] float
  tensor is never built), then the argmax.
- prefill tok/s: L / TTFT.
- FLOPs: 2 * matmul weights * L (every linear layer but the LM head) + 2 * LM head weights (the
  last position's logits only, in both engines) + 4 * layers * heads * head_dim * L(L+1)/2
  (q.k and p.v over the causal (query, key) pairs). TFLOP/s = FLOPs / TTFT, and its fraction of
  a square matmul in the model's dtype (8192^3 on CUDA), measured before and after the engines,
  the best kept.

fastgen runs first, each configuration loaded, measured and freed in turn, then HF: the engines
never hold device memory together. Results are written to --json after every measurement, so a
run cut short keeps what it measured; an HF length that runs out of memory is recorded as such.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import torch

from fastgen import LLM, SamplingParams
from fastgen.config import DTYPES, EngineConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import (
    Timer,
    add_output_options,
    begin_plot,
    end_plot,
    free_device_memory,
    matmul_tflop_s,
    report,
)
from bench.e2e.hf_baseline import load_hf
from bench.e2e.presets import model_parser
from bench.e2e.roofline import StepCost, describe_run, random_prompts, run_and_save

DEFAULT_PROMPT_LENS = "2048,8192,32768"
ENGINES = {"fastgen_chunked": "fastgen, chunked", "fastgen_one_step": "fastgen, one step",
           "hf": "HF transformers, sdpa"}  # name in the JSON -> label
CPU_KV_CACHE_GIB = 1024.0  # only lifts the CPU default: max_num_seqs=1 caps the cache at one
                           # sequence of max_model_len, and that much is allocated


@dataclass
class PrefillCost:
    """The FLOPs of one prefill of L tokens that samples one token, from the model's shapes."""

    matmul_weights: int  # multiplied per prompt token: every linear layer but the LM head
    head_weights: int    # the LM head (vocab x hidden), multiplied for the last position only
    flops_per_pair: int  # 4 * layers * heads * head_dim: q.k and p.v per (query, key) pair

    @classmethod
    def of(cls, model: torch.nn.Module, hf_config) -> PrefillCost:
        step = StepCost.of(model, hf_config)  # its matmul weights hold the LM head once
        head = hf_config.vocab_size * hf_config.hidden_size
        return cls(step.matmul_weights - head, head, step.flops_per_key)

    def flops(self, length: int) -> int:
        causal_pairs = length * (length + 1) // 2
        return (2 * self.matmul_weights * length + 2 * self.head_weights
                + self.flops_per_pair * causal_pairs)


@dataclass
class Timed:
    """One engine at one prompt length, as timed."""

    runs_s: list[float]  # each timed call, warm-up excluded
    steps: int           # model forwards until the first token

    def report(self, length: int, flops: int, matmul_tflop_s: float) -> dict:
        ttft = median(self.runs_s)
        tflop_s = flops / ttft / 1e12
        return {**asdict(self), "ttft_s": ttft, "tok_s": length / ttft, "tflop_s": tflop_s,
                "matmul_fraction": tflop_s / matmul_tflop_s}


def measure(first_token, prompt: list[int], device: str, repeats: int, long_s: float) -> Timed:
    """Times first_token(prompt), which returns the forwards it took, after an untimed warm-up:
    `repeats` times, or once where the warm-up took longer than long_s."""
    clock = Timer(device)

    def once() -> tuple[float, int]:
        start = clock.now()
        steps = first_token(prompt)
        return clock.now() - start, steps

    warm_s, steps = once()
    return Timed([once()[0] for _ in range(1 if warm_s > long_s else repeats)], steps)


def fastgen_first_token(llm: LLM):
    """A first_token for measure(): LLM.generate of one greedy token; checks that the whole
    prompt was fed (no prefix cache hit) and returns the engine steps it took."""
    stats = llm.engine.stats
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def first_token(prompt: list[int]) -> int:
        steps, fed = stats.steps, stats.prefill_tokens
        out, = llm.generate([prompt], params, use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 1, out
        assert stats.prefill_tokens - fed == len(prompt), "a prompt token was not computed"
        return stats.steps - steps

    return first_token


def hf_first_token(model, device: str):
    """A first_token for measure(): one forward over the prompt that keeps its KV cache, as
    generate's prefill does, the last position's logits only, and their argmax."""
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.inference_mode()
    def first_token(prompt: list[int]) -> int:
        ids = torch.tensor([prompt], device=device)  # [1, L]
        if keeps_logits:
            logits = model(input_ids=ids, use_cache=True, logits_to_keep=1).logits  # [1, 1, V]
        else:  # older transformers: the head over the last hidden state
            hidden = model.base_model(input_ids=ids, use_cache=True).last_hidden_state  # [1, L, H]
            logits = model.get_output_embeddings()(hidden[:, -1:])  # [1, 1, V]
        logits[0, -1].argmax().item()
        return 1

    return first_token, "logits_to_keep=1" if keeps_logits else "head over the last position"


def run(args, model: str, load_format: str, results: dict, save) -> None:
    """Measures both fastgen configurations at every length, then HF, keeping each point in
    results["points"] and calling save() after each."""
    dtype = DTYPES[args.dtype]
    lengths = results["prompt_lens"]
    matmul = matmul_tflop_s(args.device, dtype, args.matmul_size)
    results["matmul_tflop_s"] = matmul
    points = results["points"] = {str(n): {"prompt_len": n} for n in lengths}
    measured: dict[tuple[int, str], Timed] = {}

    def record(length: int, engine: str, timed: Timed) -> None:
        measured[length, engine] = timed
        point = points[str(length)]
        point[engine] = timed.report(length, point["flops"], matmul)
        hf = point.get("hf", {})
        if "tok_s" in hf:  # speed-up over HF: a ratio of tok/s, or of TTFTs inverted
            point["vs_hf"] = {name: point[name]["tok_s"] / hf["tok_s"]
                              for name in ("fastgen_chunked", "fastgen_one_step") if name in point}
        save()

    budgets = {"fastgen_chunked": args.chunk_tokens, "fastgen_one_step": max(lengths)}
    results["max_num_batched_tokens"] = budgets

    def load(budget: int) -> LLM:
        return LLM(model, dtype=args.dtype, device=args.device, load_format=load_format,
                   max_model_len=max(lengths) + 1, max_num_seqs=1, max_num_batched_tokens=budget,
                   enable_prefix_caching=False, cpu_kv_cache_gib=CPU_KV_CACHE_GIB)

    llm = load(budgets["fastgen_chunked"])  # the first configuration, read for the shapes too
    hf_config, model_dir = llm.engine.loaded.hf_config, llm.model_dir
    cost = PrefillCost.of(llm.model, hf_config)
    results["cost"] = asdict(cost)
    prompts = {n: random_prompts(1, n, hf_config.vocab_size, seed=n)[0] for n in lengths}
    for n in lengths:
        points[str(n)]["flops"] = cost.flops(n)
    for engine, budget in budgets.items():
        llm = llm or load(budget)
        first_token = fastgen_first_token(llm)
        for n in lengths:
            record(n, engine, measure(first_token, prompts[n], args.device, args.repeats,
                                      args.long_s))
        llm = first_token = None  # freed before the next engine loads
        free_device_memory(args.device)

    if not args.no_hf:
        hf = load_hf(model_dir, load_format, dtype, args.device)
        hf.set_attn_implementation("sdpa")
        results["hf_attention"] = hf.config._attn_implementation
        first_token, results["hf_logits"] = hf_first_token(hf, args.device)
        for n in lengths:
            free_device_memory(args.device)  # what a length that ran out of memory left
            try:
                timed = measure(first_token, prompts[n], args.device, args.repeats, args.long_s)
            except torch.OutOfMemoryError:
                points[str(n)]["hf"] = {"error": "out of memory"}
                save()
            else:
                record(n, "hf", timed)
        del hf, first_token
        free_device_memory(args.device)

    # Every fraction against the better of the two matmul measurements.
    matmul = results["matmul_tflop_s"] = max(matmul, matmul_tflop_s(args.device, dtype,
                                                                    args.matmul_size))
    for (n, engine), timed in list(measured.items()):
        record(n, engine, timed)


def print_table(results: dict) -> None:
    print(describe_run(results))
    print(f"one sequence, first token (greedy), prefix caching off; TTFT the median of "
          f"{results['repeats']} runs after a warm-up (1 where the warm-up took over "
          f"{results['long_s']:g} s)")
    cost = results["cost"]
    print(f"FLOPs = 2 x {cost['matmul_weights']:.3g} matmul weights x L + "
          f"{cost['flops_per_pair']} x L(L+1)/2 (attention) + 2 x {cost['head_weights']:.3g} "
          f"(LM head, last position)")
    print(f"same run: {results['dtype']} matmul {results['matmul_tflop_s']:.3f} TFLOP/s "
          f"({results['matmul_size']}^3); fastgen chunked at "
          f"{results['max_num_batched_tokens']['fastgen_chunked']} tokens per step")
    if "hf_attention" in results:
        print(f"HF transformers {results['transformers']}: attention {results['hf_attention']}, "
              f"first-token logits by {results['hf_logits']}, with its KV cache")
    print(f"{'prompt':>7}  {'engine':22} {'steps':>5} {'TTFT ms':>10} {'tok/s':>9} "
          f"{'TFLOP/s':>8} {'of matmul':>9} {'vs HF':>7}")
    for point in results["points"].values():
        length = point["prompt_len"]
        for engine, label in ENGINES.items():
            row = point.get(engine)
            if row is None:
                continue
            prompt = f"{length:7d}" if engine == "fastgen_chunked" else f"{'':7}"
            if "error" in row:
                print(f"{prompt}  {label:22} {row['error']}")
                continue
            ratio = point.get("vs_hf", {}).get(engine)
            print(f"{prompt}  {label:22} {row['steps']:5d} {1e3 * row['ttft_s']:10.2f} "
                  f"{row['tok_s']:9.0f} {row['tflop_s']:8.3f} {row['matmul_fraction']:9.1%} "
                  f"{f'{ratio:.2f}x' if ratio else '-':>7}")


def plot(results: dict, path: str) -> bool:
    """TTFT and the fraction of the matmul rate against prompt length, per engine. Returns
    False, saying so, when matplotlib is not installed."""
    panels = begin_plot(path)
    if panels is None:
        return False
    from matplotlib.ticker import NullLocator

    fig, (ttft, util) = panels
    chunk = results["max_num_batched_tokens"]["fastgen_chunked"]
    labels = {**ENGINES, "fastgen_chunked": f"fastgen, chunked ({chunk} tokens/step)"}
    styles = {"fastgen_chunked": "o-C0", "fastgen_one_step": "^--C2", "hf": "s-C1"}
    for engine, label in labels.items():
        rows = [(p["prompt_len"], p[engine]) for p in results["points"].values()
                if "ttft_s" in p.get(engine, {})]
        if rows:
            lengths = [n for n, _ in rows]
            ttft.plot(lengths, [1e3 * r["ttft_s"] for _, r in rows], styles[engine], label=label)
            util.plot(lengths, [100 * r["matmul_fraction"] for _, r in rows], styles[engine],
                      label=label)
    lengths = [p["prompt_len"] for p in results["points"].values()]
    ttft.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="time to first token, ms",
             title=f"{results['model']}, {results['dtype']}, one sequence")
    util.set(xscale="log", xlabel="prompt tokens", ylabel="TFLOP/s, % of same-run matmul",
             ylim=(0, None), title=f"{results['device_name']}, {results['date'][:10]}")
    for axes in (ttft, util):
        axes.xaxis.set_minor_locator(NullLocator())  # no log minor ticks: end_plot's lengths alone
    return end_plot(fig, path, lengths, ttft.yaxis)


def main(argv: list[str] | None = None) -> dict:
    parser = model_parser(__doc__)
    parser.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-lens", default=DEFAULT_PROMPT_LENS)
    parser.add_argument("--chunk-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                        help="fastgen's max_num_batched_tokens for the chunked runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point")
    parser.add_argument("--long-s", type=float, default=10.0,
                        help="a point whose warm-up takes longer than this is timed once")
    parser.add_argument("--matmul-size", type=int,
                        help="side of the square matmul that sets the compute roof "
                             "(default 8192 on CUDA, 1024 on CPU)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    add_output_options(parser)
    args = parser.parse_args(argv)

    if args.matmul_size is None:
        args.matmul_size = 8192 if args.device.startswith("cuda") else 1024
    return report(args, benchmark, print_table, plot)


def benchmark(args) -> dict:
    """A fresh run's results, described by its prompt lengths and timing options."""
    return run_and_save(args, run, prompt_lens=sorted(int(n) for n in args.prompt_lens.split(",")),
                        repeats=args.repeats, long_s=args.long_s, matmul_size=args.matmul_size)


if __name__ == "__main__":
    main()
