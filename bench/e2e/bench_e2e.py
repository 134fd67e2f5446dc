"""End-to-end benchmark: fastgen against Hugging Face transformers on the same model and prompts,
in the same process, plus the machine's copy bandwidth so decode can be read as a fraction of the
memory roofline.

    python bench/e2e/bench_e2e.py                       # default model, bf16, CPU
    python bench/e2e/bench_e2e.py --device cuda --json out.json

Decode rate is measured as the difference between generating 1 and 1 + N tokens (greedy,
ignore_eos), so prefill and start-up cancel out. Weight bandwidth = parameter bytes read per
decode step / step time; its fraction is taken against a measured copy (read + write) bandwidth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastgen import LLM, SamplingParams
from fastgen.tokenization import render_chat

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import Timer, copy_bandwidth, pyplot, save_figure, save_json
from bench.e2e.hf_baseline import HFRunner
from bench.e2e.presets import model_parser

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What does a compiler do?",
]


class FastgenRunner:
    def __init__(self, args):
        # No prefix caching: the repeats feed the same prompts, and each must be computed.
        self.llm = LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
                       enable_prefix_caching=False)
        self.tokenizer = self.llm.tokenizer
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.llm.model.parameters())

    def generate(self, prompt_ids: list[list[int]], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        outputs = self.llm.generate(prompt_ids, params, use_tqdm=False)
        assert all(len(o.token_ids) == max_tokens for o in outputs)


def measure(runner, prompts: list[list[int]], decode_tokens: int, device: str, repeats: int) -> dict:
    clock = Timer(device)
    first = clock.median_s(lambda: runner.generate(prompts, 1), repeats)
    full = clock.median_s(lambda: runner.generate(prompts, 1 + decode_tokens), repeats)
    step = (full - first) / decode_tokens
    return {"time_to_first_token_s": first, "decode_step_s": step, "decode_tok_s": len(prompts) / step}


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--plot", help="also draw decode tok/s and weight bandwidth against batch size "
                                       "into this PNG (needs matplotlib)")
    args = parser.parse_args()

    torch.manual_seed(0)
    bandwidth = copy_bandwidth(args.device)
    fastgen = FastgenRunner(args)
    runners = {"fastgen": fastgen}
    if not args.no_hf:
        runners["hf"] = HFRunner(args, fastgen.llm.model_dir, fastgen.tokenizer)
    tokenizer = fastgen.tokenizer
    chats = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    long_prompt = torch.randint(100, tokenizer.vocab_size - 100, (args.prefill_tokens,),
                                generator=torch.Generator().manual_seed(0)).tolist()

    results = {"model": args.model, "dtype": args.dtype, "device": args.device,
               "threads": torch.get_num_threads(), "copy_bandwidth_gb_s": bandwidth,
               "param_bytes": fastgen.param_bytes, "prefill": {}, "decode": {}}
    for name, runner in runners.items():
        seconds = Timer(args.device).median_s(lambda: runner.generate([long_prompt], 1),
                                              args.repeats)
        results["prefill"][name] = {"tokens": args.prefill_tokens, "seconds": seconds,
                                    "tok_s": args.prefill_tokens / seconds}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = [chats[i % len(chats)] for i in range(batch)]
        row = {}
        for name, runner in runners.items():
            row[name] = measure(runner, prompts, args.decode_tokens, args.device, args.repeats)
            weight_gb_s = fastgen.param_bytes / row[name]["decode_step_s"] / 1e9
            row[name]["weight_gb_s"] = weight_gb_s
            row[name]["fraction_of_copy_bw"] = weight_gb_s / bandwidth
        results["decode"][str(batch)] = row

    print(f"model {args.model}  dtype {args.dtype}  device {args.device}  threads {results['threads']}")
    print(f"copy bandwidth (read + write): {bandwidth:.1f} GB/s   weights: {fastgen.param_bytes / 1e6:.0f} MB")
    print(f"{'':24}" + "".join(f"{n:>14}" for n in runners) + ("        ratio" if "hf" in runners else ""))
    prefill = results["prefill"]
    line = f"{'prefill tok/s (' + str(args.prefill_tokens) + ')':24}" + "".join(f"{prefill[n]['tok_s']:14.1f}" for n in runners)
    print(line + (f"{prefill['fastgen']['tok_s'] / prefill['hf']['tok_s']:12.2f}x" if "hf" in runners else ""))
    for batch, row in results["decode"].items():
        line = f"{'decode tok/s, batch ' + batch:24}" + "".join(f"{row[n]['decode_tok_s']:14.1f}" for n in runners)
        print(line + (f"{row['fastgen']['decode_tok_s'] / row['hf']['decode_tok_s']:12.2f}x" if "hf" in runners else ""))
        print(f"{'  weight GB/s (% copy)':24}" + "".join(
            f"{row[n]['weight_gb_s']:8.1f} ({100 * row[n]['fraction_of_copy_bw']:3.0f}%)" for n in runners))
    if args.json:
        save_json(args.json, results)
    if args.plot:
        plot(results, args.plot)


def plot(results: dict, path: str) -> None:
    """Decode throughput and weight-bandwidth utilisation against batch size, per engine."""
    plt = pyplot()
    if plt is None:
        return
    batches = [int(b) for b in results["decode"]]
    fig, (speed, util) = plt.subplots(1, 2, figsize=(10, 4))
    for name in results["decode"][str(batches[0])]:
        rows = [results["decode"][str(b)][name] for b in batches]
        speed.plot(batches, [r["decode_tok_s"] for r in rows], marker="o", label=name)
        util.plot(batches, [100 * r["fraction_of_copy_bw"] for r in rows], marker="o", label=name)
    speed.set(xscale="log", xlabel="batch size", ylabel="decode tokens/s (all sequences)",
              title=f"{results['model']} {results['dtype']} on {results['device']}")
    util.set(xscale="log", xlabel="batch size", ylabel="weight bytes/s, % of copy bandwidth",
             title=f"copy bandwidth {results['copy_bandwidth_gb_s']:.0f} GB/s")
    for axes in (speed, util):
        axes.set_xticks(batches, [str(b) for b in batches])
        axes.grid(alpha=0.3)
        axes.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
