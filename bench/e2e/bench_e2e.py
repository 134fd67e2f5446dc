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

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fastgen import LLM, SamplingParams
from fastgen.config import DTYPES, DEFAULT_MODEL

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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int = 1 << 29) -> float:
    """Bytes read + written per second by a large tensor copy (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats=5)
    return 2 * nbytes / seconds / 1e9


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


class HFRunner:
    def __init__(self, args, model_dir, tokenizer):
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = DTYPES[args.dtype]
        if args.load_format == "random":  # same shapes, random weights: speed does not depend on them
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
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
                                  min_new_tokens=max_tokens, pad_token_id=self.pad)
        assert out.shape[1] == width + max_tokens


def measure(runner, prompts: list[list[int]], decode_tokens: int, device: str, repeats: int) -> dict:
    first = timed(lambda: runner.generate(prompts, 1), device, repeats)
    full = timed(lambda: runner.generate(prompts, 1 + decode_tokens), device, repeats)
    step = (full - first) / decode_tokens
    return {"time_to_first_token_s": first, "decode_step_s": step, "decode_tok_s": len(prompts) / step}


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


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--json, --plot and --plot-from, for a benchmark whose results are a JSON file written
    after every measurement and can be drawn again later, on any machine (see report)."""
    parser.add_argument("--json", help="write the results here (after every measurement)")
    parser.add_argument("--plot", help="draw a PNG here (needs matplotlib)")
    parser.add_argument("--plot-from", help="only draw --plot from this --json file")


def report(args, benchmark, print_table, plot) -> dict:
    """benchmark(args)'s results, or with --plot-from those read back from that JSON file,
    printed by print_table and, with --plot, drawn by plot(results, path)."""
    results = json.loads(Path(args.plot_from).read_text()) if args.plot_from else benchmark(args)
    print_table(results)
    if args.plot:
        plot(results, args.plot)
    return results


def begin_plot(path: str):
    """(fig, (left, right)): a figure of two panels side by side, drawn off screen (matplotlib's
    Agg backend), to be finished by end_plot; None, saying so, where matplotlib is not installed:
    the plot meant for `path` can then be drawn elsewhere with --plot-from."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}; draw it elsewhere with "
              f"--plot-from <the --json file> --plot {path}")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(11, 4.2))


def end_plot(fig, path: str, xs: list[int], log_axis) -> bool:
    """Writes to path (a PNG) a begin_plot figure whose panels share the x values xs: on each,
    x ticks at exactly those, labelled plainly, a grid and a legend; log_axis, a log-scale axis,
    labelled in plain numbers (200, not 2 x 10^2), its minor ticks only at the 2s and 5s (20, 50,
    200, 500, ...: not every minor tick). True, as a plot function returns when it drew."""
    from matplotlib.ticker import FuncFormatter

    log_axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    log_axis.set_minor_formatter(FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:g}"[0] in "25" else ""))
    for axes in fig.axes:
        axes.set_xticks(xs, [str(x) for x in xs])
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
    return True


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
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for p in CHAT_PROMPTS]
    long_prompt = torch.randint(100, tokenizer.vocab_size - 100, (args.prefill_tokens,),
                                generator=torch.Generator().manual_seed(0)).tolist()

    results = {"model": args.model, "dtype": args.dtype, "device": args.device,
               "threads": torch.get_num_threads(), "copy_bandwidth_gb_s": bandwidth,
               "param_bytes": fastgen.param_bytes, "prefill": {}, "decode": {}}
    for name, runner in runners.items():
        seconds = timed(lambda: runner.generate([long_prompt], 1), args.device, args.repeats)
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
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        plot(results, args.plot)


def plot(results: dict, path: str) -> None:
    """Decode throughput and weight-bandwidth utilisation against batch size, per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
