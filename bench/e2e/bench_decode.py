"""Decode against the roofline: fastgen's decode and prefill rates at a range of batch sizes, the
bytes and FLOPs each decode step must cost, the machine limits measured in the same run, and
Hugging Face transformers' `generate` on the same model, batch and prompts as the baseline.

    python bench/e2e/bench_decode.py --device cuda --model llama3.1-8b --json 8b.json --plot 8b.png
    python bench/e2e/bench_decode.py --device cuda --model .gpu_assets/smollm2 --load-format random
    python bench/e2e/bench_decode.py --batch-sizes 1,2 --prompt-len 32 --gen-len 8  # CPU, quick
    python bench/e2e/bench_decode.py --plot-from 8b.json --plot 8b.png  # the plot, on any machine

`--model llama3.1-8b` is Llama-3.1-8B's config.json (written below) with random weights and a
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

import datetime
import gc
import importlib.metadata
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean

import torch
from bench_e2e import (
    add_output_options,
    begin_plot,
    copy_bandwidth,
    end_plot,
    model_parser,
    report,
    sync,
)
from bench_offline import git_commit, matmul_peak
from fastgen import LLM, SamplingParams
from fastgen.config import DTYPES
from fastgen.outputs import RequestOutputKind

# meta-llama/Llama-3.1-8B-Instruct's config.json, in the key names both transformers 4 and 5 read.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "initializer_range": 0.02, "torch_dtype": "bfloat16",
}
SYNTHETIC_MODELS = {"llama3.1-8b": LLAMA31_8B}  # name -> config.json, run with random weights
DEFAULT_BATCH_SIZES = "1,8,32,64,128,256"


def synthetic_model_dir(config: dict, folder: Path) -> Path:
    """A model folder for load_format="random": config.json and a word-level tokenizer whose
    tokens "t0" .. "t{V-1}" cover the config's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    (folder / "config.json").write_text(json.dumps(config, indent=2))
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return folder


@dataclass
class StepCost:
    """What one decode step over a batch must read and compute, from the model's shapes. A
    "key" is one cached position one sequence attends to; a step's keys are summed over its
    sequences."""

    weight_bytes: int        # every weight but the embedding table; the LM head, tied or not
    row_bytes: int           # one embedding row: each sequence gathers one
    matmul_weights: int      # weights multiplied per token: every linear layer and the LM head
    kv_bytes_per_key: int    # 2 * layers * kv_heads * head_dim * dtype bytes
    flops_per_key: int       # 4 * layers * heads * head_dim: q.k and p.v

    @classmethod
    def of(cls, model: torch.nn.Module, hf_config) -> StepCost:
        params = dict(model.named_parameters())  # a tied LM head appears once, as the embedding
        elem = next(iter(params.values())).element_size()
        embedding = next(p for name, p in params.items() if "embed_tokens" in name)  # [V, H]
        table = 0 if getattr(hf_config, "tie_word_embeddings", False) else embedding.numel()
        total = sum(p.numel() for p in params.values())
        vectors = sum(p.numel() for p in params.values() if p.dim() == 1)  # norms, biases
        layers, heads = hf_config.num_hidden_layers, hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(weight_bytes=(total - table) * elem, row_bytes=embedding.shape[1] * elem,
                   matmul_weights=total - vectors - table,
                   kv_bytes_per_key=2 * layers * hf_config.num_key_value_heads * head_dim * elem,
                   flops_per_key=4 * layers * heads * head_dim)

    def bytes(self, batch: int, keys: float) -> float:
        return self.weight_bytes + batch * self.row_bytes + keys * self.kv_bytes_per_key

    def flops(self, batch: int, keys: float) -> float:
        return 2 * self.matmul_weights * batch + keys * self.flops_per_key


@dataclass
class Limits:
    copy_gb_s: float       # read + write bytes per second of a large device copy
    matmul_tflop_s: float  # a square matmul in the model's dtype
    matmul_size: int

    @classmethod
    def measure(cls, device: str, dtype: torch.dtype, matmul_size: int) -> Limits:
        return cls(copy_bandwidth(device), matmul_peak(device, dtype, matmul_size) / 1e12,
                   matmul_size)

    def best(self, other: Limits) -> Limits:
        return Limits(max(self.copy_gb_s, other.copy_gb_s),
                      max(self.matmul_tflop_s, other.matmul_tflop_s), self.matmul_size)


@dataclass
class Measured:
    """One engine at one batch size, as timed."""

    batch: int
    prompt_len: int
    prefill_s: float         # until every sequence had its first token
    decode_step_s: float     # mean over the timed steady-state steps
    decode_steps_timed: int
    keys: float              # cached positions attended per step (all sequences), mean of those

    def report(self, cost: StepCost, limits: Limits) -> dict:
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
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for prompt in prompts:  # outputs only at the end, as LLM.generate asks for them
        engine.add_request(prompt, params, output_kind=RequestOutputKind.FINAL_ONLY)
    prompt_tokens, generated_before = sum(len(p) for p in prompts), stats.generation_tokens
    steps = []
    while engine.has_unfinished():
        prefilled, decoded = stats.prefill_tokens, stats.decode_tokens
        sync(device)
        start = time.perf_counter()
        engine.step()
        sync(device)
        seconds = time.perf_counter() - start
        # A sequence with k output tokens after a decode step fed token k - 1 and attended to
        # its prompt and those k - 1 tokens plus itself. In a step that decoded every sequence,
        # none has finished, so their k add up to the tokens generated so far.
        keys = prompt_tokens - len(prompts) + stats.generation_tokens - generated_before
        steps.append(EngineStep(seconds, stats.prefill_tokens - prefilled,
                                stats.decode_tokens - decoded, keys))
    return steps


def measure_fastgen(llm: LLM, prompts: list[list[int]], gen_len: int, device: str) -> Measured:
    batch = len(prompts)
    sync(device)
    start = time.perf_counter()
    run_engine(llm, prompts, 1, device)
    prefill_s = time.perf_counter() - start
    steady = [s for s in run_engine(llm, prompts, gen_len, device)
              if s.prefill_tokens == 0 and s.decode_tokens == batch]
    if not steady:
        raise SystemExit(f"no engine step decoded all {batch} sequences at once (KV cache too "
                         f"small? raise --cpu-kv-cache-gib or --gen-len)")
    return Measured(batch, len(prompts[0]), prefill_s, fmean([s.seconds for s in steady]),
                    len(steady), fmean([s.keys for s in steady]))


# Hugging Face transformers: generate, its steps timed by a stopping criterion.

def load_hf(model_dir: Path, load_format: str, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "random":
        with torch.device(device):  # initialised where it runs: no host copy of 16 GB first
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], gen_len: int, device: str) -> list[float]:
    """generate over the batch; returns the times at its start and at each new token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    times = []

    class StepClock(StoppingCriteria):  # called once per step, after the new token; stops nothing
        def __call__(self, input_ids, scores, **kwargs):  # input_ids: [B, P + tokens so far]
            sync(device)
            times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor(prompts, device=device)  # [B, P]: equal lengths, so no padding
    sync(device)
    times.append(time.perf_counter())
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

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), platform.machine())
    return f"{model}, {torch.get_num_threads()} threads"


def random_prompts(batch: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).tolist()


def free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def batch_sizes(text: str, every: list[int]) -> list[int]:
    """'all' (every), '' (none) or a comma-separated list."""
    return every if text == "all" else [int(b) for b in text.split(",") if b]


def run_and_save(args, run, **description) -> dict:
    """A roofline benchmark's results: what was run where, when and with which versions, then
    `description`, then what run(args, model, load_format, results, save) adds to them, model
    being a folder written for a SYNTHETIC_MODELS preset, and save() writing them to --json."""
    load_format = "random" if args.model in SYNTHETIC_MODELS else args.load_format
    results = {"model": args.model, "weights": "random" if load_format == "random" else "real",
               "dtype": args.dtype, "device": args.device, "device_name": device_name(args.device),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": git_commit(), "torch": torch.__version__,
               "transformers": importlib.metadata.version("transformers"), **description}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastgen-bench-") as folder:
        model = args.model
        if model in SYNTHETIC_MODELS:
            model = str(synthetic_model_dir(SYNTHETIC_MODELS[model], Path(folder)))
        run(args, model, load_format, results, save)
    results["wall_s"] = time.perf_counter() - start
    save()
    return results


def run(args, model: str, load_format: str, results: dict, save) -> None:
    """Measures fastgen at every batch size, then HF at its own, keeping each point in
    results["points"] (with the limits measured so far) and calling save() after each."""
    dtype = DTYPES[args.dtype]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    hf_batches = [b for b in batch_sizes(args.hf_batch_sizes, batches) if b in batches]
    limits = Limits.measure(args.device, dtype, args.matmul_size)
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

    def record(batch: int, engine: str, m: Measured, limits: Limits) -> None:
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
    limits = limits.best(Limits.measure(args.device, dtype, args.matmul_size))
    results["limits"] = asdict(limits)
    for (batch, engine), m in list(measured.items()):
        record(batch, engine, m, limits)


def describe_run(results: dict) -> str:
    """run_and_save's description of the run in one line, a table's first."""
    return (f"model {results['model']} ({results['weights']} weights, {results['dtype']})  "
            f"device {results['device_name']}  {results['date']}  commit {results['commit']}")


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
