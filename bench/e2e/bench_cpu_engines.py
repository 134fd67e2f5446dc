"""The default model on a CPU, fastgen against llama.cpp and Hugging Face transformers in one run,
on the same prompts and the same GGUF file.

    python bench/e2e/bench_cpu_engines.py --json cpu-engines.json --plot cpu-engines.png
    python bench/e2e/bench_cpu_engines.py --quick          # 1 repeat, short runs
    python bench/e2e/bench_cpu_engines.py --plot-from cpu-engines.json --plot cpu-engines.png

Engines (each skipped with a note when it cannot run here):
- fastgen-gguf: SmolLM2-135M-Instruct's Q4_1 GGUF as the file stores it (the default);
- fastgen-bf16: the same file dequantized (--dequantize), bf16;
- llama.cpp: llama-cpp-python (an optional bench dependency, built from source by pip:
  `CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python`) on the same Q4_1 file, and on any
  further GGUF files given with --llama-cpp-gguf (e.g. Q8_0 / bf16 files made with llama.cpp's
  convert_hf_to_gguf.py, which pip's llama-cpp-python does not ship); one sequence at a time, so
  batch 1 only, as its high-level API runs;
- hf: transformers on the converted folder, bf16.

Measured, with the thread count given (--threads, default all cores), each number the best of
--repeats runs:
- prefill tok/s: a 512-token prompt's forward pass (fastgen: max_tokens=1, prefix caching off).
- decode tok/s at batch 1, 8 and 16 (aggregate): B * (G2 - G1) / (time(G2) - time(G1)) for
  greedy runs of G1 and G2 tokens with ignore_eos from 16-token prompts, so prefill cancels out.
- bandwidth fraction (decode, batch 1): bytes the step must read (the linear weights and the LM
  head as each engine stores them) / step time / the same run's copy bandwidth, counted as
  bench_decode.py counts it (read + written bytes per second, so a pure read stream can pass
  100%).
The CPU's name and flags (AMX, AVX512-VNNI / BF16) go into the JSON: results differ by CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import (add_output_options, copy_bandwidth, cpu_name, report,  # noqa: E402
                          run_metadata, save_json)

PROMPT_LEN, PREFILL_LEN = 16, 512
BATCHES = (1, 8, 16)


def best(repeats: int, fn) -> float:
    return min(fn() for _ in range(repeats))


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (batch, length), generator=g).tolist()


def fastgen_engine(args, dequantize: bool) -> dict:
    from fastgen import LLM, SamplingParams, quantization

    llm = LLM("smollm2", device="cpu", dtype="bfloat16", dequantize=dequantize,
              enable_prefix_caching=False, max_model_len=1024)
    model = llm.engine.model_runner.model if hasattr(llm.engine, "model_runner") else None
    out = {"weights": "Q4_1 + Q8_0 (as stored)" if not dequantize else "bf16 (dequantized)"}
    if model is not None and not dequantize:
        out["described"] = quantization.describe(model)

    def run(batch, tokens, length=PROMPT_LEN) -> float:
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        ps = prompts(batch, length)
        start = time.perf_counter()
        llm.generate(ps, params, use_tqdm=False)
        return time.perf_counter() - start

    run(1, 4)  # warm-up
    out["prefill_tok_s"] = PREFILL_LEN / best(args.repeats, lambda: run(1, 1, PREFILL_LEN))
    g1, g2 = args.gen_lens
    for b in BATCHES:
        t1 = best(args.repeats, lambda: run(b, g1))
        t2 = best(args.repeats, lambda: run(b, g2))
        out[f"decode_b{b}_tok_s"] = b * (g2 - g1) / max(t2 - t1, 1e-9)
    llm.engine.close()
    return out


def llama_cpp_engine(args, path: Path) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed"}
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)

    def prefill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompts(1, PREFILL_LEN)[0])
        return time.perf_counter() - start

    def decode(tokens: int) -> float:
        llm.reset()
        llm.eval(prompts(1, PROMPT_LEN)[0])
        start = time.perf_counter()
        for _ in range(tokens):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])  # greedy, as the others
        return time.perf_counter() - start

    out = {"file": path.name, "prefill_tok_s": PREFILL_LEN / best(args.repeats, prefill)}
    g1, g2 = args.gen_lens
    t1, t2 = best(args.repeats, lambda: decode(g1)), best(args.repeats, lambda: decode(g2))
    out["decode_b1_tok_s"] = (g2 - g1) / max(t2 - t1, 1e-9)
    return out


def hf_engine(args, folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()

    def prefill() -> float:
        ids = torch.tensor(prompts(1, PREFILL_LEN))
        start = time.perf_counter()
        with torch.no_grad():
            model(ids)
        return time.perf_counter() - start

    def generate(batch, tokens) -> float:
        ids = torch.tensor(prompts(batch, PROMPT_LEN))
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, pad_token_id=2)
        return time.perf_counter() - start

    out = {"weights": "bf16", "prefill_tok_s": PREFILL_LEN / best(args.repeats, prefill)}
    g1, g2 = args.gen_lens
    for b in BATCHES:
        t1, t2 = best(args.repeats, lambda: generate(b, g1)), best(args.repeats, lambda: generate(b, g2))
        out[f"decode_b{b}_tok_s"] = b * (g2 - g1) / max(t2 - t1, 1e-9)
    return out


def step_bytes(gguf_path: Path) -> dict[str, int]:
    """Bytes a batch-1 decode step reads per engine: every layer's linear weights and the LM head
    (the tied table), as stored: the file's blocks for the GGUF engines, bf16 for the others."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    quantized = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)
    elements = sum(int(t.n_elements) for t in reader.tensors if len(t.shape) == 2)
    return {"gguf": quantized, "bf16": 2 * elements}


def run(args) -> dict:
    from fastgen.envs import cpu_flags
    from fastgen.loader.hub import SOURCE_GGUF, default_model_dir

    torch.set_num_threads(args.threads)
    folder = default_model_dir()
    gguf_path = folder / SOURCE_GGUF
    flags = cpu_flags()
    results = {**run_metadata("cpu"), "cpu": cpu_name(), "threads": args.threads,
               "cpu_features": sorted(f for f in flags if f.startswith(("amx", "avx512_vnni",
                                                                         "avx512_bf16", "avx512f"))),
               "model": "SmolLM2-135M-Instruct", "prompt_len": PROMPT_LEN,
               "prefill_len": PREFILL_LEN, "gen_lens": list(args.gen_lens), "engines": {}}
    results["copy_gb_s"] = copy_bandwidth("cpu")
    results["step_bytes"] = step_bytes(gguf_path)
    engines = results["engines"]

    def save():
        if args.json:
            save_json(args.json, results)

    plan = [("fastgen-gguf", lambda: fastgen_engine(args, dequantize=False)),
            ("fastgen-bf16", lambda: fastgen_engine(args, dequantize=True)),
            ("llama.cpp", lambda: llama_cpp_engine(args, gguf_path))]
    plan += [(f"llama.cpp {Path(p).name}", lambda p=p: llama_cpp_engine(args, Path(p)))
             for p in args.llama_cpp_gguf]
    if not args.no_hf:
        plan.append(("hf", lambda: hf_engine(args, folder)))
    for name, fn in plan:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        engines[name] = fn()
        save()
    for name, row in engines.items():
        if "decode_b1_tok_s" in row:
            stored = "bf16" if "bf16" in name or name == "hf" else "gguf"
            row["bandwidth_fraction_b1"] = (results["step_bytes"][stored] * row["decode_b1_tok_s"]
                                            / (results["copy_gb_s"] * 1e9))
    save()
    return results


def print_table(results: dict) -> None:
    print(f"{results['cpu']} ({', '.join(results['cpu_features'])}), {results['threads']} threads, "
          f"{results['date']}, commit {results['commit']}; copy {results['copy_gb_s']:.1f} GB/s")
    cols = ["prefill_tok_s"] + [f"decode_b{b}_tok_s" for b in BATCHES] + ["bandwidth_fraction_b1"]
    print(f"{'engine':28s}" + "".join(f"{c.replace('_tok_s', ''):>18s}" for c in cols))
    for name, row in results["engines"].items():
        if "skipped" in row:
            print(f"{name:28s} skipped: {row['skipped']}")
            continue
        cells = [f"{row[c]:18.3f}" if c == "bandwidth_fraction_b1" and c in row else
                 f"{row[c]:18.1f}" if c in row else f"{'-':>18s}" for c in cols]
        print(f"{name:28s}" + "".join(cells))


def plot(results: dict, path: str) -> None:
    from bench.common import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return
    names = [n for n, r in results["engines"].items() if "skipped" not in r]
    cols = ["prefill_tok_s"] + [f"decode_b{b}_tok_s" for b in BATCHES]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.6))
    for ax, col in zip(axes, cols):
        values = [results["engines"][n].get(col, 0) for n in names]
        ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(col.replace("_tok_s", " tok/s").replace("_", " "))
    fig.suptitle(f"SmolLM2-135M on {results['cpu']}, {results['threads']} threads ({results['date']})")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-lens", type=lambda s: tuple(int(x) for x in s.split(",")),
                        default=(8, 72), help="G1,G2 of the decode difference")
    parser.add_argument("--llama-cpp-gguf", action="append", default=[],
                        help="more GGUF files for llama.cpp (e.g. Q8_0 / bf16 conversions)")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 repeat, gen lens 4,20")
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.gen_lens = 1, (4, 20)
    report(args, run, print_table, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
