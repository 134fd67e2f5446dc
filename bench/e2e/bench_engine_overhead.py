"""The engine's host (Python) time per decode step: what each `LLMEngine.step` costs besides the
model's forward pass, at batch 1, 64 and 256, with a breakdown by phase.

    python bench/e2e/bench_engine_overhead.py                     # the tiny test model, CPU
    python bench/e2e/bench_engine_overhead.py --batch-sizes 1,16 --max-tokens 128

On a GPU with CUDA graphs the forward pass of a decode step is one graph replay, and everything
else the step does — schedule, build the inputs, sample, detokenize, check stops, build outputs —
is Python on the host, between the device's steps. To measure that Python on a CPU, the model is
the tiny Llama of the engine tests (2 layers, hidden size 64, a 384-token byte-level BPE
vocabulary, float32), whose forward is cheap, and its time is measured and subtracted rather
than stubbed out: the forward still writes the KV cache and produces real logits, so the sampled
tokens, the text and every stop check are what a real run does. The prompts are random token
ids (seeded), all of one length, decoded greedily with ignore_eos, so every request of a batch
runs the same number of steps and the steady state is one decode token per sequence per step.

Four passes per batch size:
- generate: `LLM.generate` of the batch (what offline users and fastgen-generate run; its
  requests want only their final outputs). Only `engine.step` and the model's forward are timed:
  host = step - forward. These are the headline numbers (no timer inside the loops).
- generate with a breakdown: each phase wrapped in a timer as well (per-sequence phases cost
  ~0.2 us of timer per call, a few percent of host time at batch 256): schedule
  (`Scheduler.schedule`), prepare (the step's ModelInput, `build_model_input`, and the model
  runner's tensors of it, `forward_batch`, or a decode graph's staging), forward (model forward +
  logits, or the decode graph's replay), sample (sampler and the tokens' copy to the host),
  detokenize + stop strings (`IncrementalDetokenizer.step`), output building
  (`_Request.output`), the rest of the step (applying the output in the scheduler among it).
- stream: the engine stepped by hand with DELTA outputs, one per request and step (what the
  server's AsyncLLMEngine does), timed as the first pass.
- cumulative: the same with CUMULATIVE outputs, add_request's default (what bench_decode.py
  times: each output copies every sample's tokens so far).
Every pass also reports the time spent in the garbage collector's pauses during the steps.
A step counts when it decoded every sequence of the batch and fed no prompt token; times are
means over those steps. A batch runs again (new prompts) until --min-steps steps are in.

Where the ratio matters: an 8B model's CUDA-graph decode step takes ~6 ms at batch 1 and 8-12 ms
at batch 64-256 on an H100, so host time is to be read against those.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from fastgen import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import cpu_name, git_commit, save_json

REPO = Path(__file__).resolve().parents[2]


def tiny_model(folder: Path) -> Path:
    """The engine tests' tiny Llama, written to folder (tests/engine/tiny_model.py)."""
    spec = importlib.util.spec_from_file_location("tiny_model",
                                                  REPO / "tests" / "engine" / "tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_tiny_llama(folder / "tiny")


class PhaseTimer:
    """Accumulates wall time by phase, from wrapped callables and from the garbage collector's
    pauses, until take() hands out the sums since the last take. Wrapping replaces an attribute
    (of an object, or of a class for methods called per sequence); close() puts every one back."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._patched: list[tuple[object, str, object]] = []
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.seconds["gc"] += time.perf_counter() - self._gc_start

    def wrap(self, owner: object, name: str, phase: str) -> None:
        original = getattr(owner, name)
        sums = self.seconds

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sums[phase] += time.perf_counter() - start

        self._patched.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, timed)

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)
        for owner, name, before in reversed(self._patched):
            if before is None:
                delattr(owner, name)  # an instance attribute shadowing the class's method
            else:
                setattr(owner, name, before)
        self._patched.clear()

    def take(self) -> dict[str, float]:
        taken = dict(self.seconds)
        self.seconds.clear()
        return taken


def wrap_phases(timer: PhaseTimer, llm: LLM, breakdown: bool) -> None:
    from fastgen.engine import engine as engine_module
    from fastgen.engine.detokenizer import IncrementalDetokenizer

    engine = llm.engine
    runner = engine.model_runner
    timer.wrap(engine, "step", "step")
    timer.wrap(runner.model, "forward", "forward")
    timer.wrap(runner.model, "compute_logits", "forward")
    if runner.decode_graphs is not None:  # a decode step's forward is a graph replay
        from fastgen.engine.step_graph import StepGraph

        timer.wrap(StepGraph, "replay", "forward")
    if not breakdown:
        return
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine_module, "build_model_input", "model_input")  # the step's ModelInput
    timer.wrap(runner, "execute", "run")
    timer.wrap(runner, "forward_batch", "tensors")  # the input's lists as tensors
    if runner.decode_graphs is not None:  # or, for a graph, written into its static buffers
        timer.wrap(runner.decode_graphs, "_stage", "tensors")
    timer.wrap(runner, "_sample", "sample")
    timer.wrap(IncrementalDetokenizer, "step", "detokenize")
    timer.wrap(engine_module._Request, "output", "outputs")


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> None:
    """The offline way: LLM.generate (its requests FINAL_ONLY)."""
    llm.generate(prompts, params, use_tqdm=False)


def by_hand(llm: LLM, prompts: list[list[int]], params: SamplingParams, **add_options) -> None:
    """The engine stepped as a server steps it, reading every output."""
    engine = llm.engine
    for prompt in prompts:
        engine.add_request(prompt, params, **add_options)
    while engine.has_unfinished():
        for out in engine.step():
            out.outputs[0].delta  # noqa: B018  (what a stream reads)


def stream(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> None:
    """The server's way: requests added DELTA, an output per request and step."""
    from fastgen.outputs import RequestOutputKind

    by_hand(llm, prompts, params, output_kind=RequestOutputKind.DELTA)


def cumulative(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> None:
    """add_request's default, CUMULATIVE outputs (what bench_decode.py times)."""
    by_hand(llm, prompts, params)


MODES = {"generate": generate, "stream": stream, "cumulative": cumulative}


def measure(llm: LLM, mode: str, batch: int, prompt_len: int, max_tokens: int,
            min_steps: int, breakdown: bool, seed: int) -> dict:
    """Mean seconds per steady decode step, by phase, over rounds of `mode` on a batch."""
    vocab = len(llm.tokenizer)
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    stats = llm.engine.stats
    timer = PhaseTimer()
    wrap_phases(timer, llm, breakdown)
    totals: dict[str, float] = defaultdict(float)
    steps = 0
    timed_step = llm.engine.step

    def counted_step():
        nonlocal steps
        prefilled, decoded = stats.prefill_tokens, stats.decode_tokens
        timer.take()
        outputs = timed_step()
        phases = timer.take()
        if stats.prefill_tokens == prefilled and stats.decode_tokens - decoded == batch:
            steps += 1
            for phase, seconds in phases.items():
                totals[phase] += seconds
        return outputs

    llm.engine.step = counted_step
    try:
        while steps < min_steps:
            prompts = torch.randint(0, vocab, (batch, prompt_len), generator=generator).tolist()
            MODES[mode](llm, prompts, params)
    finally:
        llm.engine.step = timed_step
        timer.close()
    means = {phase: seconds / steps for phase, seconds in totals.items()}
    for phase in ("gc", "tensors"):  # (no collection, no eager step among the timed ones)
        means.setdefault(phase, 0.0)
    means["host"] = means["step"] - means["forward"]
    if breakdown:
        means["prepare"] = means["model_input"] + means["tensors"]
        means["run_other"] = means["run"] - means["tensors"] - means["forward"] - means["sample"]
        means["step_other"] = (means["step"] - means["schedule"] - means["model_input"]
                               - means["run"] - means["detokenize"] - means["outputs"])
    means["steps"] = steps
    return means


PASSES = [("generate", False), ("generate", True), ("stream", False), ("cumulative", False)]
ROWS = [("schedule", "schedule"), ("prepare", "prepare inputs"), ("sample", "sample"),
        ("run_other", "rest of model_runner.execute"), ("detokenize", "detokenize + stop strings"),
        ("outputs", "build outputs"), ("step_other", "rest of step, apply output")]


def report(results: dict) -> str:
    batches = list(results["points"])
    lines = [(f"model {results['model']}  dtype {results['dtype']}  device {results['device']}  "
              f"cpu {results['cpu']}  torch threads {results['threads']}  "
              f"commit {results['commit']}"),
             (f"prompt {results['prompt_len']} tokens, {results['max_tokens']} generated, "
              f"greedy; ms per steady decode step (mean)"),
             f"{'':32}" + "".join(f"{'batch ' + b:>12}" for b in batches)]

    def row(label: str, key: str, mode: str, per_seq: bool = False) -> None:
        points = [results["points"][b].get(mode) for b in batches]
        if any(p is None for p in points):
            return
        values = [p[key] / (int(b) if per_seq else 1) for p, b in zip(points, batches)]
        lines.append(f"{label:32}" + "".join(f"{v * 1e3:12.3f}" for v in values))

    titles = {"generate": "LLM.generate (FINAL_ONLY outputs), no timers inside",
              "stream": "engine.step with DELTA outputs (as the server), no timers inside",
              "cumulative": "engine.step with CUMULATIVE outputs (as bench_decode.py)"}
    for mode, title in titles.items():
        if mode not in results["modes"]:
            continue
        lines.append(title + ":")
        row("  step", "step", mode)
        row("  forward (model)", "forward", mode)
        row("  host = step - forward", "host", mode)
        row("  host per sequence", "host", mode, per_seq=True)
        row("  in GC pauses", "gc", mode)
    if "generate" in results["modes"]:
        lines.append("LLM.generate, breakdown (timers in the loop):")
        for key, label in [("step", "step"), ("forward", "forward (model)"), *ROWS,
                           ("gc", "in GC pauses (within the above)")]:
            row("  " + label, key, "generate+breakdown")
    lines.append("steps measured per pass: " + ", ".join(
        f"batch {b}: {results['points'][b]['generate']['steps']}" for b in batches))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="a model LLM() takes (default: the tiny test model, built here)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-steps", type=int, default=192,
                        help="steady steps to measure at least, per batch size and pass")
    parser.add_argument("--modes", default="generate,stream,cumulative",
                        help="generate (LLM.generate), stream (DELTA outputs), cumulative "
                             "(CUMULATIVE outputs): any of them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp)))
        llm = LLM(model, dtype=args.dtype, device=args.device, max_num_seqs=max(batches),
                  enable_prefix_caching=False)
        results = {"model": args.model or "tiny test model", "dtype": args.dtype,
                   "device": args.device, "cpu": cpu_name(),
                   "threads": torch.get_num_threads(), "commit": git_commit(),
                   "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                   "modes": modes, "points": {}}
        for mode in modes:
            measure(llm, mode, batches[0], args.prompt_len, 4, 1, False, args.seed)  # warm-up
        for batch in batches:
            steps = max(args.min_steps, args.max_tokens - 1)
            point = results["points"][str(batch)] = {}
            for mode, breakdown in PASSES:
                if mode in modes:
                    point[mode + ("+breakdown" if breakdown else "")] = measure(
                        llm, mode, batch, args.prompt_len, args.max_tokens, steps, breakdown,
                        args.seed + batch)
    print(report(results))
    if args.json is not None:
        save_json(args.json, results, indent=1)
    return results


if __name__ == "__main__":
    main()
