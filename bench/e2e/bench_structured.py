"""Structured outputs, end to end: decode throughput at batch B with every request constrained by a
JSON schema against the same requests unconstrained, in the same run and process, and the time
to compile a schema (the grammar engine's tokenizer built once, then a new schema, then the same
schema again: a cache hit).

    python bench/e2e/bench_structured.py                     # default model, bf16, CPU, B = 16
    python bench/e2e/bench_structured.py --batch 64 --device cuda --json out.json

The schema asks for an object holding a list of at least 64 strings, so no constrained request
can finish inside --max-tokens: both runs decode exactly B x max_tokens tokens, and the
difference is what the masks cost (filled on a worker thread during the forward pass, applied
in the sampler). Strings allow most of the vocabulary, the expensive case for a mask.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from fastgen import LLM, SamplingParams, StructuredOutputs
from fastgen.outputs import FinishReason
from fastgen.tokenization import render_chat

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import Timer, add_output_options, cpu_name, run_metadata, save_json
from bench.e2e.presets import model_parser

SCHEMA = {"type": "object", "required": ["notes"], "additionalProperties": False,
          "properties": {"notes": {"type": "array", "items": {"type": "string"},
                                   "minItems": 64}}}
PROMPT = "Write short notes about the history of Paris, as JSON."


def decode_rate(llm: LLM, batch: int, max_tokens: int, constraint, trials: int,
                device: str) -> dict:
    """Generated tokens per second of `batch` copies of the prompt, each sampling max_tokens
    tokens (temperature 0.8, a seed per request), best and median of `trials`."""
    prompt = render_chat(llm.tokenizer, [{"role": "user", "content": PROMPT}])
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=True,
                             structured_outputs=constraint) for i in range(batch)]
    clock = Timer(device)
    llm.generate([prompt] * batch, params, use_tqdm=False)  # warm-up: graphs, compiled grammar
    rates, texts = [], []
    for _ in range(trials):
        start = clock.now()
        outs = llm.generate([prompt] * batch, params, use_tqdm=False)
        seconds = clock.now() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        assert all(o.outputs[0].finish_reason is FinishReason.LENGTH for o in outs)
        rates.append(tokens / seconds)
        texts = [o.outputs[0].text for o in outs]
    return {"tokens_per_s_best": max(rates), "tokens_per_s_median": statistics.median(rates),
            "example": texts[0][:120]}


def compile_times(llm: LLM) -> dict:
    """Seconds to build the grammar engine's tokenizer (once per engine), to compile a schema
    never seen, and to compile it again."""
    compiler = llm.engine.grammars
    start = time.perf_counter()
    compiler._llg_tokenizer()
    tokenizer_s = time.perf_counter() - start
    fresh = StructuredOutputs(json={**SCHEMA, "title": f"fresh-{time.time_ns()}"})
    start = time.perf_counter()
    compiler.compile(fresh)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    compiler.compile(StructuredOutputs(json=json.loads(json.dumps(fresh.json))))
    second_s = time.perf_counter() - start
    return {"tokenizer_s": tokenizer_s, "first_compile_s": first_s, "second_compile_s": second_s}


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    add_output_options(parser)
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
              max_num_seqs=max(args.batch, 16))
    results = {**run_metadata(args.device), "cpu": cpu_name(), "model": args.model,
               "dtype": args.dtype, "batch": args.batch, "max_tokens": args.max_tokens}
    results["compile"] = compile_times(llm)
    # Alternate, so a drift in the machine's speed hits both alike.
    plain = decode_rate(llm, args.batch, args.max_tokens, None, args.trials, args.device)
    constrained = decode_rate(llm, args.batch, args.max_tokens,
                              StructuredOutputs(json=SCHEMA), args.trials, args.device)
    plain_again = decode_rate(llm, args.batch, args.max_tokens, None, args.trials, args.device)
    best_plain = max(plain["tokens_per_s_best"], plain_again["tokens_per_s_best"])
    results.update(unconstrained=plain, constrained=constrained, unconstrained_again=plain_again,
                   slowdown=1 - constrained["tokens_per_s_best"] / best_plain)
    compile_ = results["compile"]
    print(f"{results['device_name']}, {args.model} {args.dtype}, batch "
          f"{args.batch} x {args.max_tokens} tokens")
    print(f"  unconstrained: {plain['tokens_per_s_best']:.1f} tok/s (again: "
          f"{plain_again['tokens_per_s_best']:.1f})")
    print(f"  JSON schema:   {constrained['tokens_per_s_best']:.1f} tok/s "
          f"({100 * results['slowdown']:.1f}% slower)  e.g. {constrained['example']!r}")
    print(f"  compile: tokenizer {compile_['tokenizer_s'] * 1e3:.1f} ms once, a new schema "
          f"{compile_['first_compile_s'] * 1e3:.2f} ms, again {compile_['second_compile_s'] * 1e6:.1f} us")
    if args.json:
        save_json(args.json, results)


if __name__ == "__main__":
    main()
