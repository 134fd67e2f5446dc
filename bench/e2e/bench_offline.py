"""Offline throughput: a few hundred prompts of mixed lengths through `LLM.generate` (all queued at
once, continuous batching), against Hugging Face transformers' batched `generate` over the same
prompts (fixed-size batches, left padding, as users run it), in the same process, dtype and
threads.

    python bench/e2e/bench_offline.py                       # default model, bf16, CPU
    python bench/e2e/bench_offline.py --device cuda --num-prompts 1000 --max-prompt-len 1024

Prompts are random token ids (seeded), of lengths drawn uniformly from [--min-prompt-len,
--max-prompt-len]: with greedy decoding and ignore_eos the speed does not depend on what the
tokens say, and random ids share no prefix, so fastgen's prefix cache finds nothing to reuse.
Every request generates exactly --output-len tokens in both engines (HF: min_new_tokens =
max_new_tokens), so both do the same useful work. Beside the rates, each engine's model FLOP/s
(2 x matmul parameters per token fed, plus the LM head per token sampled; attention's own
products left out, and HF's padding not counted as useful) is set against a square matmul in
the same dtype measured in the same run, and the copy bandwidth is printed for reference.

The defaults (256 prompts of 16-256 tokens, 64 output tokens each, HF in batches of 32) keep the
whole run under about four minutes on a 2-core CPU, HF's padded prefill being most of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastgen import LLM, SamplingParams
from fastgen.config import DTYPES, CacheConfig, EngineConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import MachineLimits, Timer, git_commit, save_json
from bench.e2e.hf_baseline import HFRunner
from bench.e2e.presets import model_parser


def make_prompts(tokenizer, num: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """num prompts of random token ids, their lengths uniform in [min_len, max_len]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=generator).tolist()
    return [torch.randint(100, tokenizer.vocab_size - 100, (n,), generator=generator).tolist()
            for n in lengths]


def model_flops(model, prompt_tokens: int, output_tokens: int, num_prompts: int) -> float:
    """2 x matmul parameters per token fed (every prompt token, and every output token but the
    last), plus 2 x the LM head (vocab x hidden, tied or not) per token sampled."""
    params = dict(model.named_parameters())
    head = next(p.numel() for name, p in params.items() if "embed" in name)  # [vocab, hidden]
    linear = sum(p.numel() for name, p in params.items()
                 if p.dim() == 2 and "embed" not in name and "lm_head" not in name)
    fed = prompt_tokens + output_tokens - num_prompts
    return 2 * linear * fed + 2 * head * output_tokens


def output_ids(out) -> list[int]:
    """A RequestOutput's generated ids: vLLM's shape (.outputs[0]) where there is one."""
    return out.outputs[0].token_ids if hasattr(out, "outputs") else out.token_ids


def run_fastgen(llm: LLM, prompts: list[list[int]], output_len: int, device: str) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    stats = llm.engine.stats
    fed, hit = stats.prefill_tokens, stats.prefix_cache_hit_tokens
    clock = Timer(device)
    start = clock.now()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = clock.now() - start
    fed, hit = stats.prefill_tokens - fed, stats.prefix_cache_hit_tokens - hit
    # A sequence preempted when the KV cache ran full is prefilled again, prompt and output so
    # far; what that re-prefill finds in the prefix cache is not fed.
    return {"seconds": seconds, "output_tokens": sum(len(output_ids(o)) for o in outputs),
            "prefill_tokens_fed": fed, "prefix_cache_hit_tokens": hit,
            "recomputed_tokens": fed + hit - sum(len(p) for p in prompts)}


def run_hf(hf: HFRunner, prompts: list[list[int]], output_len: int, batch_size: int,
           device: str) -> dict:
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    clock = Timer(device)
    start = clock.now()
    for batch in batches:
        # Asserts that every row came back padded width + output_len long: min_new_tokens keeps
        # EOS out, so each row generated exactly output_len tokens.
        hf.generate(batch, output_len)
    seconds = clock.now() - start
    return {"seconds": seconds, "output_tokens": len(prompts) * output_len,
            "padded_prompt_tokens": sum(len(b) * max(len(p) for p in b) for b in batches)}


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--min-prompt-len", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64, help="tokens every request generates")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts")
    parser.add_argument("--hf-batch-size", type=int, default=32,
                        help="HF generate runs over the prompts in batches of this size, in order")
    parser.add_argument("--hf-sort-by-length", action="store_true",
                        help="batch HF's prompts by length instead, so batches carry less padding")
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int,
                        default=EngineConfig.max_num_batched_tokens)
    parser.add_argument("--cpu-kv-cache-gib", type=float, default=CacheConfig.cpu_kv_cache_gib)
    parser.add_argument("--skip-hf", action="store_true", help="skip the Hugging Face baseline")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    # Measured before and after the engines, the best of the two kept (MachineLimits.best).
    limits = MachineLimits.measure(args.device, dtype)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              cpu_kv_cache_gib=args.cpu_kv_cache_gib)
    prompts = make_prompts(llm.tokenizer, args.num_prompts, args.min_prompt_len,
                           args.max_prompt_len, args.seed)
    prompt_tokens = sum(len(p) for p in prompts)
    # One-time costs (first-call allocations, kernel selection) are paid on a few unrelated
    # prompts before the clock starts.
    warm = make_prompts(llm.tokenizer, 4, args.min_prompt_len, args.max_prompt_len, args.seed + 1)
    llm.generate(warm, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), use_tqdm=False)
    engines = {"fastgen": run_fastgen(llm, prompts, args.output_len, args.device)}
    if not args.skip_hf:
        hf = HFRunner(args, llm.model_dir, llm.tokenizer)
        hf.generate(warm, 2)
        hf_prompts = sorted(prompts, key=len) if args.hf_sort_by_length else prompts
        engines["hf"] = run_hf(hf, hf_prompts, args.output_len, args.hf_batch_size, args.device)

    limits = limits.best(MachineLimits.measure(args.device, dtype))
    flops = model_flops(llm.model, prompt_tokens, args.num_prompts * args.output_len,
                        args.num_prompts)
    for row in engines.values():
        seconds = row["seconds"]
        row["requests_s"] = args.num_prompts / seconds
        row["output_tok_s"] = row["output_tokens"] / seconds
        row["total_tok_s"] = (prompt_tokens + row["output_tokens"]) / seconds
        row["model_tflop_s"] = flops / seconds / 1e12
        row["fraction_of_matmul_peak"] = row["model_tflop_s"] / limits.matmul_tflop_s
    same = len({row["output_tokens"] for row in engines.values()}) == 1
    results = {"model": args.model, "dtype": args.dtype, "device": args.device,
               "threads": torch.get_num_threads(), "commit": git_commit(),
               "copy_bandwidth_gb_s": limits.copy_gb_s,
               "matmul_peak_tflop_s": limits.matmul_tflop_s,
               "num_prompts": args.num_prompts, "prompt_len_range": [args.min_prompt_len,
                                                                     args.max_prompt_len],
               "prompt_tokens": prompt_tokens, "output_len": args.output_len, "seed": args.seed,
               "hf_batch_size": None if args.skip_hf else args.hf_batch_size,
               "hf_sort_by_length": args.hf_sort_by_length,
               "max_num_seqs": args.max_num_seqs,
               "max_num_batched_tokens": args.max_num_batched_tokens,
               "cpu_kv_cache_gib": args.cpu_kv_cache_gib,
               "same_output_tokens": same, "engines": engines}
    if "hf" in engines:
        results["ratio_fastgen_over_hf"] = engines["hf"]["seconds"] / engines["fastgen"]["seconds"]
    print_table(results)
    if args.json:
        save_json(args.json, results)
    if not same:
        raise SystemExit("the engines generated different numbers of tokens")


def print_table(results: dict) -> None:
    engines = results["engines"]
    low, high = results["prompt_len_range"]
    print(f"model {results['model']}  dtype {results['dtype']}  device {results['device']}  "
          f"threads {results['threads']}  commit {results['commit']}")
    print(f"{results['num_prompts']} prompts of {low}-{high} random token ids (seed "
          f"{results['seed']}, {results['prompt_tokens']} tokens), {results['output_len']} output "
          f"tokens each (greedy, ignore_eos)")
    print(f"same run (best of before and after): copy bandwidth (read + write) "
          f"{results['copy_bandwidth_gb_s']:.1f} GB/s, {results['dtype']} matmul "
          f"{results['matmul_peak_tflop_s']:.3f} TFLOP/s")
    has_hf = "hf" in engines
    print(f"{'':26}" + "".join(f"{n:>12}" for n in engines) + ("    speed-up" if has_hf else ""))
    rows = [("total time, s", "seconds", "{:12.1f}"), ("requests/s", "requests_s", "{:12.2f}"),
            ("output tokens/s", "output_tok_s", "{:12.1f}"),
            ("total tokens/s", "total_tok_s", "{:12.1f}"),
            ("model TFLOP/s", "model_tflop_s", "{:12.3f}"),
            ("  of matmul peak", "fraction_of_matmul_peak", "{:12.0%}")]
    # Both engines do the same work, so every rate's ratio is the ratio of the total times.
    speedup = f"{results['ratio_fastgen_over_hf']:11.2f}x" if has_hf else ""
    for label, key, form in rows:
        print(f"{label:26}" + "".join(form.format(engines[n][key]) for n in engines)
              + (speedup if key != "fraction_of_matmul_peak" else ""))
    print(f"{'output tokens generated':26}" + "".join(f"{engines[n]['output_tokens']:12}"
                                                    for n in engines)
          + ("   same" if results["same_output_tokens"] else "   DIFFERENT"))
    fastgen = engines["fastgen"]
    print(f"fastgen prefill: {fastgen['prefill_tokens_fed']} tokens fed for "
          f"{results['prompt_tokens']} prompt tokens; {fastgen['recomputed_tokens']} prefilled "
          f"again after preemption (KV cache full), {fastgen['prefix_cache_hit_tokens']} found "
          f"in the prefix cache")
    if has_hf:
        padded = engines["hf"]["padded_prompt_tokens"]
        order = "sorted by length" if results["hf_sort_by_length"] else "in order"
        print(f"hf: batches of {results['hf_batch_size']} ({order}), left padded: {padded} "
              f"prompt positions computed for {results['prompt_tokens']} tokens "
              f"({padded / results['prompt_tokens'] - 1:.0%} padding)")


if __name__ == "__main__":
    main()
