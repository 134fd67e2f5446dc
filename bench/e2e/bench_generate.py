"""Generation throughput on a GSM8K-shaped file: `fastgen-generate` (the whole job, as a user runs
it: reading the parquet, chat template, n samples per prompt, writing the result) against Hugging
Face transformers' batched `generate` on the same rows, chat-templated the same way, with the
same sampling (verl's example: temperature 1.0, top_k 50, top_p 0.7) and n samples per row
(`num_return_sequences`), in the same run.

    python bench/e2e/bench_generate.py                        # default model, bf16, CPU
    python bench/e2e/bench_generate.py --rows 64 --n-samples 5 --response-length 512

The rows come from synthetic_gsm8k.py (made-up grade-school problems in verl's schema). Sampled
answers end at EOS at different lengths, so both engines are credited with the tokens actually
generated up to EOS (HF's batch runs until its longest row ends; fastgen frees a finished
sequence's slot at once). Both times exclude loading the model: fastgen's is the generation time
the job reports in its summary (reading, templating, generating and writing), HF's the generate
calls; the job's whole wall time, process start and model load included, is reported beside.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import save_json
from bench.e2e.synthetic_gsm8k import make_rows, write_parquet


def run_fastgen(args, data: Path, output: Path) -> dict:
    command = [sys.executable, "-m", "fastgen.entrypoints.generate", f"data.path={data}",
               f"data.output_path={output}", f"model.path={args.model}",
               f"data.n_samples={args.n_samples}", f"data.batch_size={args.rows}",
               f"rollout.temperature={args.temperature}", f"rollout.top_k={args.top_k}",
               f"rollout.top_p={args.top_p}", f"rollout.prompt_length={args.prompt_length}",
               f"rollout.response_length={args.response_length}",
               f"rollout.dtype={args.dtype}", f"rollout.seed={args.seed}",
               "data.save_details=true"]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    sys.stderr.write(done.stderr)
    # The job's own summary: its generation time, without process start and model load.
    match = re.search(r"tokens generated in ([0-9.]+) s", done.stderr)
    table = pq.read_table(output).to_pylist()
    tokens = sum(sum(row["response_tokens"]) for row in table)
    return {"seconds": float(match.group(1)) if match else wall, "job_wall_seconds": wall,
            "output_tokens": tokens, "rows": len(table),
            "samples": sum(len(row["responses"]) for row in table)}


@torch.inference_mode()
def run_hf(args, rows: list[dict]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastgen.config import parse_dtype
    from fastgen.loader.hub import resolve_model
    from fastgen.tokenization import render_chat

    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=parse_dtype(args.dtype)).eval()
    eos = set(model.generation_config.eos_token_id if isinstance(
        model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [render_chat(tokenizer, r["prompt"]) for r in rows]
    prompts = [p[-args.prompt_length:] for p in prompts]
    torch.manual_seed(args.seed)
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), args.hf_batch_rows):
        batch = prompts[i:i + args.hf_batch_rows]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             max_new_tokens=args.response_length,
                             num_return_sequences=args.n_samples, pad_token_id=pad)
        for row in out[:, width:].tolist():  # tokens up to and including the first EOS
            end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            tokens += end
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": tokens, "rows": len(prompts),
            "samples": len(prompts) * args.n_samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.7)
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--response-length", type=int, default=256)
    parser.add_argument("--hf-batch-rows", type=int, default=8,
                        help="rows per HF generate call (each expanded to n samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    rows = make_rows(args.rows, args.seed)
    results = {"config": vars(args), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        data, output = Path(tmp) / "gsm8k.parquet", Path(tmp) / "generated.parquet"
        write_parquet(rows, str(data))
        results["fastgen"] = run_fastgen(args, data, output)
    if not args.skip_hf:
        results["hf"] = run_hf(args, rows)

    print(f"model {args.model}  dtype {args.dtype}  {args.rows} GSM8K-shaped rows x "
          f"{args.n_samples} samples, up to {args.response_length} tokens, temperature "
          f"{args.temperature} top_k {args.top_k} top_p {args.top_p}")
    print(f"{'':24}{'fastgen':>12}{'hf':>12}{'ratio':>10}")
    engines = [e for e in ("fastgen", "hf") if e in results]
    print(f"{'fastgen job wall time, s':24}{results['fastgen']['job_wall_seconds']:>12.1f}")
    for name, key in (("time, s", "seconds"), ("generated tokens", "output_tokens")):
        print(f"{name:24}" + "".join(f"{results[e][key]:>12.1f}" for e in engines))
    for e in engines:
        r = results[e]
        r["prompts_per_s"] = r["rows"] / r["seconds"]
        r["tokens_per_s"] = r["output_tokens"] / r["seconds"]
    for name, key in (("prompts/s", "prompts_per_s"), ("generated tokens/s", "tokens_per_s")):
        line = f"{name:24}" + "".join(f"{results[e][key]:>12.2f}" for e in engines)
        if len(engines) == 2:
            ratio = results["fastgen"][key] / results["hf"][key]
            results[f"ratio_{key}"] = ratio
            line += f"{ratio:>9.2f}x"
        print(line)
    if args.json:
        save_json(args.json, results)


if __name__ == "__main__":
    main()
