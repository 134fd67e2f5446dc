"""Decode against the roofline: fastgen's decode and prefill rates at a range of batch sizes, the
bytes and FLOPs each decode step must cost, the machine limits measured in the same run, and
Hugging Face transformers' `generate` on the same model, batch and prompts as the baseline.

    python bench/e2e/bench_decode.py --device cuda --model llama3.1-8b --json 8b.json --plot 8b.png
    python bench/e2e/bench_decode.py --device cuda --model .gpu_assets/smollm2 --load-format random
    python bench/e2e/bench_decode.py --batch-sizes 1,2 --prompt-len 32 --gen-len 8  # CPU, quick
    python bench/e2e/bench_decode.py --plot-from 8b.json --plot 8b.png  # the plot, on any machine

`--model llama3.1-8b` is Llama-3.1-8B's config.json (presets.py) with random weights and a
word-level tokenizer over its 128256 ids, so it needs no download: the prompts are token ids, and
greedy decoding with ignore_eos costs the same whatever the weights say. The tokenizer only turns
outputs into text, but it must know every id: one that decoded to nothing (a smaller tokenizer's
missing ids) would make the detokenizer re-decode an ever longer window.

Each batch of B prompts is P random token ids long (P = --prompt-len) and generates G tokens
(greedy, ignore_eos; HF: min_new_tokens = max_new_tokens), prefix caching off; fastgen runs with
its defaults otherwise (on CUDA, CUDA graphs for decode steps; --enforce-eager turns them off).
- prefill tok/s: B * P / the time until every sequence has its first token, from a run with
  G = 1 (fastgen: chunked prefill alone; HF: its one prefill forward).
- decode step time: the mean over steady-state steps, timed one by one: fastgen's engine steps
  that decoded all B sequences and fed no prompt token (while later prompts are still being
  prefilled, continuous batching mixes the two, so those steps are left out); HF's every step
  after the first token (timed through a stopping criterion that stops nothing). Decode tok/s is
  B / step time. Timing steps, rather than differencing a 1-token and a (1 + G)-token run, keeps
  prefill out even where chunked prefill overlaps it with the first sequences' decoding.
- bytes per step: every weight but the embedding table (of which only B rows are gathered), the
  LM head included, plus the KV cache read, 2 * layers * kv_heads * head_dim * dtype bytes per
  cached position attended, summed over the batch at the timed steps' contexts.
- bandwidth utilisation: bytes / step time / copy bandwidth, the copy's read + write bytes per
  second (so a kernel that only reads could pass 100%).
- roofline step time: max(bytes / copy bandwidth, FLOPs / matmul rate), where FLOPs = 2 * matmul
  weights * B + 4 * layers * heads * head_dim per cached position attended, and the matmul rate
  is a square bf16 matmul's (8192^3 on CUDA). Reported as step time / roofline time.
The copy bandwidth and matmul rate are measured before and after the engines, the best kept.

fastgen runs first, then is freed, then HF: the engines never hold device memory together (an 8B
model is 16 GB in bf16, and fastgen takes gpu_memory_utilization of the device for its cache,
here capped at what the largest batch needs, as max_model_len = P + G by default). Results are written to
--json after every measurement, so a run cut short keeps what it measured; an HF batch that runs
out of memory is recorded as such and the larger ones are skipped.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean

import torch

from fastgen import LLM, SamplingParams
from fastgen.config import DTYPES
from fastgen.outputs import RequestOutputKind

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import (
    MachineLimits,
    Timer,
    add_output_options,
    begin_plot,
    end_plot,
    free_device_memory,
    report,
)
from bench.e2e.hf_baseline import load_hf
from bench.e2e.presets import model_parser
from bench.e2e.roofline import StepCost, describe_run, random_prompts, run_and_save

DEFAULT_BATCH_SIZES = "1,8,32,64,128,256"


@dataclass
class Measured:
    """One engine at one batch size, as timed."""

    batch: int
    prompt_len: int
    prefill_s: float         # until every sequence had its first token
    decode_step_s: float     # mean over the timed steady-state steps
    decode_steps_timed: int
    keys: float              # cached positions attended per step (all sequences), mean of those

    def report(self, cost: StepCost, limits: MachineLimits) -> dict:
        step_bytes = cost.bytes(self.batch, self.keys)
        step_flops = cost.flops(self.batch, self.keys)
        memory_s = step_bytes / (limits.copy_gb_s * 1e9)
        compute_s = step_flops / (limits.matmul_tflop_s * 1e12)
        roofline_s = max(memory_s, compute_s)
        return {**asdict(self),
                "prefill_tok_s": self.batch * self.prompt_len / self.prefill_s,
                "decode_tok_s": self.batch / self.decode_step_s,
                "mean_context": self.keys / self.batch,
                "bytes_per_step": step_bytes, "gb_s": step_bytes / self.decode_step_s / 1e9,
                "bandwidth_utilisation": memory_s / self.decode_step_s,
                "flops_per_step": step_flops, "tflop_s": step_flops / self.decode_step_s / 1e12,
                "roofline_step_s": roofline_s,
                "roofline_bound": "memory" if memory_s >= compute_s else "compute",
                "step_over_roofline": self.decode_step_s / roofline_s}


# fastgen: the engine stepped by hand, each step timed.

@dataclass
class EngineStep:
    seconds: float
    prefill_tokens: int  # prompt tokens fed
    decode_tokens: int   # sequences decoded
    keys: int            # for a step that only decoded: cached positions its sequences attended


def run_engine(llm: LLM, prompts: list[list[int]], max_tokens: int,
               device: str) -> list[EngineStep]:
    """Queues every prompt and steps the engine until all are done, timing each step."""
    engine = llm.engine
    stats = engine.stats
    clock = Timer(device)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for prompt in prompts:  # outputs only at the end, as LLM.generate asks for them
        engine.add_request(prompt, params, output_kind=RequestOutputKind.FINAL_ONLY)
    prompt_tokens, generated_before = sum(len(p) for p in prompts), stats.generation_tokens
    steps = []
    while engine.has_unfinished():
        prefilled, decoded = stats.prefill_tokens, stats.decode_tokens
        start = clock.now()
        engine.step()
        seconds = clock.now() - start
        # A sequence with k output tokens after a decode step fed token k - 1 and attended to
        # its prompt and those k - 1 tokens plus itself. In a step that decoded every sequence,
        # none has finished, so their k add up to the tokens generated so far.
        keys = prompt_tokens - len(prompts) + stats.generation_tokens - generated_before
        steps.append(EngineStep(seconds, stats.prefill_tokens - prefilled,
                                stats.decode_tokens - decoded, keys))
    return steps


def measure_fastgen(llm: LLM, prompts: list[list[int]], gen_len: int, device: str) -> Measured:
    batch = len(prompts)
    clock = Timer(device)
    start = clock.now()
    run_engine(llm, prompts, 1, device)
    prefill_s = clock.now() - start
    steady = [s for s in run_engine(llm, prompts, gen_len, device)
              if s.prefill_tokens == 0 and s.decode_tokens == batch]
    if not steady:
        raise SystemExit(f"no engine step decoded all {batch} sequences at once (KV cache too "
                         f"small? raise --cpu-kv-cache-gib or --gen-len)")
    return Measured(batch, len(prompts[0]), prefill_s, fmean([s.seconds for s in steady]),
                    len(steady), fmean([s.keys for s in steady]))


# Hugging Face transformers: generate, its steps timed by a stopping criterion.

@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], gen_len: int, device: str) -> list[float]:
    """generate over the batch; returns the times at its start and at each new token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    times = []
    clock = Timer(device)

    class StepClock(StoppingCriteria):  # called once per step, after the new token; stops nothing
        def __call__(self, input_ids, scores, **kwargs):  # input_ids: [B, P + tokens so far]
            times.append(clock.now())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor(prompts, device=device)  # [B, P]: equal lengths, so no padding
    times.append(clock.now())
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=gen_len, min_new_tokens=gen_len, pad_token_id=0,
                         stopping_criteria=StoppingCriteriaList([StepClock()]))
    assert out.shape == (len(prompts), len(prompts[0]) + gen_len), out.shape
    assert len(times) == 1 + gen_len, "HF called the stopping criteria other than once a step"
    return times


def measure_hf(model, prompts: list[list[int]], gen_len: int, device: str) -> Measured:
    batch, prompt_len = len(prompts), len(prompts[0])
    times = run_hf(model, prompts, gen_len, device)
    # The step bringing token k + 1 (k >= 1) feeds token k and attends to P + k positions.
    return Measured(batch, prompt_len, times[1] - times[0],
                    (times[-1] - times[1]) / (gen_len - 1), gen_len - 1,
                    fmean([batch * (prompt_len + k) for k in range(1, gen_len)]))


# The run.

def batch_sizes(text: str, every: list[int]) -> list[int]:
    """'all' (every), '' (none) or a comma-separated list."""
    return every if text == "all" else [int(b) for b in text.split(",") if b]


def run(args, model: str, load_format: str, results: dict, save) -> None:
    """Measures fastgen at every batch size, then HF at its own, keeping each point in
    results["points"] (with the limits measured so far) and calling save() after each."""
    dtype = DTYPES[args.dtype]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    hf_batches = [b for b in batch_sizes(args.hf_batch_sizes, batches) if b in batches]
    limits = MachineLimits.measure(args.device, dtype, args.matmul_size)
    results["limits"] = asdict(limits)
    eager = {"enforce_eager": True} if args.enforce_eager else {}  # else the engine's default
    llm = LLM(model, dtype=args.dtype, device=args.device, load_format=load_format,
              max_model_len=args.max_model_len, max_num_seqs=max(batches),
              enable_prefix_caching=False, cpu_kv_cache_gib=args.cpu_kv_cache_gib, **eager)
    hf_config, model_dir = llm.engine.loaded.hf_config, llm.model_dir
    cost = StepCost.of(llm.model, hf_config)
    results["cost"] = asdict(cost)
    measured: dict[tuple[int, str], Measured] = {}
    points = results["points"] = {str(b): {"batch": b} for b in batches}

    def record(batch: int, engine: str, m: Measured, limits: MachineLimits) -> None:
        measured[batch, engine] = m
        point = points[str(batch)]
        point[engine] = m.report(cost, limits)
        if engine == "hf":
            fast, hf = point["fastgen"], point["hf"]
            point["decode_ratio"] = fast["decode_tok_s"] / hf["decode_tok_s"]
            point["prefill_ratio"] = fast["prefill_tok_s"] / hf["prefill_tok_s"]
        save()

    prompts = {b: random_prompts(b, args.prompt_len, hf_config.vocab_size, seed=b)
               for b in batches}
    warm = random_prompts(2, args.prompt_len, hf_config.vocab_size, seed=0)
    run_engine(llm, warm, 4, args.device)  # first-call costs (allocator, kernel selection)
    for batch in batches:
        record(batch, "fastgen", measure_fastgen(llm, prompts[batch], args.gen_len, args.device),
               limits)
    del llm
    free_device_memory(args.device)

    if hf_batches:
        hf = load_hf(model_dir, load_format, dtype, args.device)
        run_hf(hf, warm, 4, args.device)
        for batch in hf_batches:
            try:
                measured_hf = measure_hf(hf, prompts[batch], args.gen_len, args.device)
            except torch.OutOfMemoryError:  # larger batches would too
                points[str(batch)]["hf"] = {"error": "out of memory"}
                save()
                break
            record(batch, "hf", measured_hf, limits)
        del hf
        free_device_memory(args.device)

    # Every fraction against the best limits of the two measurements.
    limits = limits.best(MachineLimits.measure(args.device, dtype, args.matmul_size))
    results["limits"] = asdict(limits)
    for (batch, engine), m in list(measured.items()):
        record(batch, engine, m, limits)


def print_table(results: dict) -> None:
    print(describe_run(results))
    cost = results["cost"]
    print(f"prompt {results['prompt_len']} + {results['gen_len']} generated, greedy, ignore_eos; "
          f"weights read per step {cost['weight_bytes'] / 1e9:.3f} GB, KV "
          f"{cost['kv_bytes_per_key'] / 1024:.1f} KiB per cached position")
    limits = results["limits"]
    print(f"same run: copy bandwidth (read + write) {limits['copy_gb_s']:.1f} GB/s, "
          f"{results['dtype']} matmul {limits['matmul_tflop_s']:.3f} TFLOP/s "
          f"({limits['matmul_size']}^3)")
    print(f"{'':5} {'prefill tok/s':>16} {'decode tok/s':>23}   {'fastgen decode step':>39}"
          f"  {'HF':>4}")
    print(f"{'batch':>5} {'fastgen':>8} {'HF':>7} {'fastgen':>8} {'HF':>7} {'ratio':>6} "
          f"{'ms':>8} {'GB':>7} {'BW util':>7} {'roof ms':>7} {'bound':>7} {'/roof':>6} "
          f"{'util':>5}")
    for point in results["points"].values():
        fast, hf = point.get("fastgen"), point.get("hf", {})
        if fast is None:
            continue
        if "decode_tok_s" in hf:
            hf_cols = (f"{hf['prefill_tok_s']:7.0f}", f"{hf['decode_tok_s']:7.1f}",
                       f"{point['decode_ratio']:5.2f}x", f"{hf['bandwidth_utilisation']:5.0%}")
        else:
            hf_cols = (f"{hf.get('error', '-'):>7}", f"{'-':>7}", f"{'-':>6}", f"{'-':>5}")
        print(f"{point['batch']:5d} {fast['prefill_tok_s']:8.0f} {hf_cols[0]} "
              f"{fast['decode_tok_s']:8.1f} {hf_cols[1]} {hf_cols[2]} "
              f"{1e3 * fast['decode_step_s']:8.2f} {fast['bytes_per_step'] / 1e9:7.3f} "
              f"{fast['bandwidth_utilisation']:7.0%} {1e3 * fast['roofline_step_s']:7.2f} "
              f"{fast['roofline_bound']:>7} {fast['step_over_roofline']:5.2f}x {hf_cols[3]}")


def plot(results: dict, path: str) -> bool:
    """Decode tokens/s (with the roofline's) and bandwidth utilisation against batch size.
    Returns False, saying so, when matplotlib is not installed."""
    panels = begin_plot(path)
    if panels is None:
        return False
    fig, (speed, util) = panels

    points = [p for p in results["points"].values() if "fastgen" in p]
    for engine, label, style in (("fastgen", "fastgen", "o-C0"), ("hf", "HF transformers", "s-C1")):
        rows = [(p["batch"], p[engine]) for p in points if "decode_tok_s" in p.get(engine, {})]
        if not rows:
            continue
        batches = [b for b, _ in rows]
        speed.plot(batches, [r["decode_tok_s"] for _, r in rows], style, label=label)
        util.plot(batches, [100 * r["bandwidth_utilisation"] for _, r in rows], style,
                  label=f"{label}: bytes/s, % of copy bandwidth")
        if engine == "fastgen":
            speed.plot(batches, [b / r["roofline_step_s"] for b, r in rows], "k--",
                       label="roofline")
            util.plot(batches, [100 / r["step_over_roofline"] for _, r in rows], "o:C0",
                      label="fastgen: roofline time, % of step time")
    batches = [p["batch"] for p in points]
    speed.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s",
              title=f"{results['model']}, {results['dtype']}, {results['prompt_len']} + "
                    f"{results['gen_len']} tokens")
    util.set(xscale="log", xlabel="batch size", ylabel="%", ylim=(0, 110),
             title=f"{results['device_name']}, {results['date'][:10]}")
    return end_plot(fig, path, batches, speed.yaxis)


def main(argv: list[str] | None = None) -> dict:
    parser = model_parser(__doc__)
    parser.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES)
    parser.add_argument("--hf-batch-sizes", default="all",
                        help="the batch sizes HF generate runs too: 'all', a list, or '' for none")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--matmul-size", type=int,
                        help="side of the square matmul that sets the compute roof "
                             "(default 8192 on CUDA, 1024 on CPU)")
    parser.add_argument("--max-model-len", type=int,
                        help="fastgen's context length (default: prompt + gen, which also caps "
                             "its KV cache at what the largest batch needs)")
    parser.add_argument("--cpu-kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="fastgen without CUDA graphs (to see what they bring)")
    add_output_options(parser)
    args = parser.parse_args(argv)

    if not args.plot_from:  # a fresh run's defaults and checks; a replot reads its JSON alone
        if args.max_model_len is None:
            args.max_model_len = args.prompt_len + args.gen_len
        if args.matmul_size is None:
            args.matmul_size = 8192 if args.device.startswith("cuda") else 1024
        if args.gen_len < 2:
            parser.error("--gen-len must be at least 2 (one token after the first is decoded)")
    return report(args, benchmark, print_table, plot)


def benchmark(args) -> dict:
    """A fresh run's results, described by its lengths and engine options."""
    return run_and_save(args, run, prompt_len=args.prompt_len, gen_len=args.gen_len,
                        max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                        points={})


if __name__ == "__main__":
    main()
