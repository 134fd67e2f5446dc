"""Tensor parallelism on this machine's CPU: decode and prefill rates of one model at TP 1 (every
core in one process) and TP 2 (half the cores in each of two processes, the shared-memory
all-reduce between them), measured in the same run.

    python bench/e2e/bench_tp.py [--model llama3.2-1b] [--json tp.json]

Decode: B prompts of P random ids, greedy, ignore_eos; tok/s = B * (G - 1) / (time of G new
tokens - time of 1), so prefill drops out. Prefill: one prompt of L ids and one new token; tok/s =
L / time. The best of --repeats runs each.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from fastgen import LLM, SamplingParams

from bench.common import run_metadata, save_json
from bench.e2e.presets import SYNTHETIC_MODELS, model_parser, synthetic_model_dir


def timed(llm, prompts, max_tokens: int, repeats: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return best


def measure(folder: str, args, tp: int) -> dict:
    llm = LLM(folder, dtype=args.dtype, device="cpu", load_format=args.load_format,
              tensor_parallel_size=tp, max_model_len=max(args.prefill_len, args.prompt_len) + 64,
              enable_prefix_caching=False)
    g = torch.Generator().manual_seed(0)
    vocab = llm.engine.loaded.hf_config.vocab_size
    row = {"tp": tp, "threads_per_rank": torch.get_num_threads(), "decode": {}}
    try:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
        for batch in args.batch_sizes:
            prompts = torch.randint(vocab, (batch, args.prompt_len), generator=g).tolist()
            one = timed(llm, prompts, 1, args.repeats)
            full = timed(llm, prompts, args.gen_len, args.repeats)
            row["decode"][batch] = batch * (args.gen_len - 1) / (full - one)
        prompt = torch.randint(vocab, (1, args.prefill_len), generator=g).tolist()
        row["prefill_tok_s"] = args.prefill_len / timed(llm, prompt, 1, args.repeats)
    finally:
        llm.engine.close()
    return row


def main() -> None:
    parser = model_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(model="llama3.2-1b")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=17)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = {**run_metadata("cpu"), "model": args.model, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if args.model in SYNTHETIC_MODELS:
            folder = str(synthetic_model_dir(SYNTHETIC_MODELS[args.model], Path(tmp)))
            args.load_format = "random"
        threads = torch.get_num_threads()
        for tp in (1, 2):
            torch.set_num_threads(threads)  # TP 2's rank 0 takes its share below
            row = measure(folder, args, tp)
            results["runs"].append(row)
            decode = ", ".join(f"batch {b}: {r:.1f} tok/s" for b, r in row["decode"].items())
            print(f"TP {tp} ({row['threads_per_rank']} thread(s) per rank): decode {decode}; "
                  f"prefill {args.prefill_len} tokens: {row['prefill_tok_s']:.0f} tok/s",
                  flush=True)
            if args.json:
                save_json(args.json, results)
    print(results["device_name"])


if __name__ == "__main__":
    main()
