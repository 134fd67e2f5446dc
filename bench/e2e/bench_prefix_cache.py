"""Prefix caching, end to end: a chat whose long system prompt (~600 tokens) is the same for every
request, followed by short user questions, sent one at a time. Time to first token (a prefill and
one sampled token) and the tokens each request's prefill fed the model, with prefix caching on
and — the baseline, in the same run — off.

    python bench/e2e/bench_prefix_cache.py                   # default model, bf16, CPU
    python bench/e2e/bench_prefix_cache.py --device cuda --system-tokens 2000

With the cache on, the first request prefills everything and each later one only the blocks
after the system prompt's last full block; with it off, every request prefills everything.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from fastgen import LLM, SamplingParams
from fastgen.tokenization import render_chat

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import Timer
from bench.e2e.presets import model_parser

SYSTEM_SENTENCES = [
    "You are a careful, friendly assistant for the staff of a small public library.",
    "Answer in plain language, in at most three sentences, and say so when you do not know.",
    "The library opens at nine in the morning and closes at seven in the evening on weekdays.",
    "On Saturdays it opens at ten and closes at four; it is closed on Sundays and holidays.",
    "Members may borrow up to twelve items at once for three weeks, renewable twice online.",
    "Late returns cost twenty cents a day per item, capped at the item's replacement price.",
    "The reading room on the second floor is silent; group study rooms are booked at the desk.",
    "Printing costs ten cents a page in black and white and fifty cents a page in colour.",
]
QUESTIONS = [
    "When does the library open on Saturday?",
    "How many books can I borrow?",
    "What does colour printing cost?",
    "Can I renew a loan online?",
    "Where can my study group meet?",
    "Is the library open on Sunday?",
]


def system_prompt(tokenizer, target_tokens: int) -> str:
    """Library rules, repeated until they are about target_tokens long."""
    sentences: list[str] = []
    while len(tokenizer.encode(" ".join(sentences))) < target_tokens:
        sentences.append(SYSTEM_SENTENCES[len(sentences) % len(SYSTEM_SENTENCES)])
    return " ".join(sentences)


def first_tokens(llm: LLM, prompts: list[list[int]], device: str) -> list[dict]:
    """Each prompt alone, in turn: its time to first token and what its prefill fed and hit."""
    stats = llm.engine.stats
    params = SamplingParams(max_tokens=1, temperature=0)
    clock = Timer(device)
    rows = []
    for prompt in prompts:
        fed, hit = stats.prefill_tokens, stats.prefix_cache_hit_tokens
        start = clock.now()
        llm.generate([prompt], params, use_tqdm=False)
        rows.append({"tokens": len(prompt), "seconds": clock.now() - start,
                     "prefilled": stats.prefill_tokens - fed,
                     "cached": stats.prefix_cache_hit_tokens - hit})
    return rows


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--system-tokens", type=int, default=600)
    args = parser.parse_args()

    # Both engines live side by side and take turns, request by request, so neither pays for
    # running first in the process.
    llms = {enable: LLM(args.model, dtype=args.dtype, device=args.device,
                        load_format=args.load_format, enable_prefix_caching=enable)
            for enable in (True, False)}
    tokenizer = llms[True].tokenizer
    block_size = llms[True].engine.config.cache.block_size
    system = system_prompt(tokenizer, args.system_tokens)
    prompts = [render_chat(tokenizer, [{"role": "system", "content": system},
                                       {"role": "user", "content": q}]) for q in QUESTIONS]
    # Warm up on unrelated prompts of the same length, so the first request pays no one-time
    # costs and shares nothing.
    warm = [torch.randint(100, tokenizer.vocab_size - 100, (len(prompts[0]),),
                          generator=torch.Generator().manual_seed(seed)).tolist()
            for seed in range(3)]
    results: dict[bool, list[dict]] = {True: [], False: []}
    for llm in llms.values():
        first_tokens(llm, warm, args.device)
    for i, prompt in enumerate(prompts):
        for enable in ((True, False) if i % 2 == 0 else (False, True)):
            results[enable] += first_tokens(llms[enable], [prompt], args.device)

    print(f"model {args.model}  dtype {args.dtype}  device {args.device}  "
          f"threads {torch.get_num_threads()}  block size {block_size}")
    print(f"{'request':>8}{'tokens':>8} | {'cache on: prefilled':>20}{'TTFT ms':>9}"
          f"{'prefill tok/s':>15} | {'cache off: prefilled':>21}{'TTFT ms':>9}"
          f"{'prefill tok/s':>15} | {'speed-up':>8}")
    for i, (on, off) in enumerate(zip(results[True], results[False])):
        print(f"{i:>8}{on['tokens']:>8} | {on['prefilled']:>20}{1e3 * on['seconds']:>9.1f}"
              f"{on['prefilled'] / on['seconds']:>15.0f} | {off['prefilled']:>21}"
              f"{1e3 * off['seconds']:>9.1f}{off['prefilled'] / off['seconds']:>15.0f} | "
              f"{off['seconds'] / on['seconds']:>7.1f}x")
    later_on = statistics.median(r["seconds"] for r in results[True][1:])
    later_off = statistics.median(r["seconds"] for r in results[False][1:])
    print(f"median TTFT of requests 1..{len(QUESTIONS) - 1}: {1e3 * later_on:.1f} ms with the "
          f"prefix cache, {1e3 * later_off:.1f} ms without ({later_off / later_on:.1f}x); "
          f"first request: {1e3 * results[True][0]['seconds']:.1f} / "
          f"{1e3 * results[False][0]['seconds']:.1f} ms")


if __name__ == "__main__":
    main()
