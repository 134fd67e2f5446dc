"""fastgen on a CPU it shares: decode and serving rates alone and beside a competing process that
keeps --competitor-threads threads busy with matmuls (another program on the user's machine),
in one run.

    python bench/e2e/bench_shared_cpu.py --json shared-cpu.json
    GOMP_SPINCOUNT=0 python bench/e2e/bench_shared_cpu.py   # another wait policy, same script

Measured on the default model (its Q4_1 file as stored), greedy, ignore_eos:
- offline decode tok/s at batch 1 and 16: B * (G2 - G1) / (t(G2) - t(G1)), best of --repeats;
- serving: bench_serve.py's single-stream decode rate and 16 concurrent streaming clients'
  aggregate tok/s and inter-token latency p50 / p99, against a fastgen-serve it starts.
Each alone, then with the competitor running. Getting about half the CPU, a rate that drops to
about half is the fair share; far below it is a collapse (OpenMP workers spinning or waiting at
barriers for a descheduled thread).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import cpu_name, run_metadata, save_json  # noqa: E402
from bench.e2e.cpu_workloads import decode_rates, prompts  # noqa: E402

COMPETITOR = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
while True:
    a @ b
"""


class Competitor:
    """A process keeping `threads` threads busy until closed."""

    def __init__(self, threads: int):
        self.process = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(threads)])
        time.sleep(2)  # its threads running

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def offline(args) -> dict:
    from fastgen import LLM, SamplingParams

    llm = LLM("smollm2", enable_prefix_caching=False, max_model_len=1024)

    def run(batch: int, tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts(batch, 16), params, use_tqdm=False)
        return time.perf_counter() - start

    run(1, 4)
    rates = {}
    for label in ("alone", "contended"):
        competitor = Competitor(args.competitor_threads) if label == "contended" else None
        try:
            rates[label] = {k: v for k, v in decode_rates(run, args.repeats, (8, 40)).items()
                            if k != "decode_b8_tok_s"}
        finally:
            if competitor:
                competitor.close()
    llm.engine.close()
    return rates


def serving(args) -> dict:
    script = Path(__file__).with_name("bench_serve.py")
    out = {}
    for label in ("alone", "contended"):
        competitor = Competitor(args.competitor_threads) if label == "contended" else None
        try:
            path = Path(f"/tmp/fastgen-shared-serve-{os.getpid()}-{label}.json")
            subprocess.run([sys.executable, str(script), "--num-requests", "32", "--num-single",
                            "2", "--json", str(path)], check=True, stdout=subprocess.DEVNULL)
            result = json.loads(path.read_text())
            path.unlink()
        finally:
            if competitor:
                competitor.close()
        conc = result["concurrent"]
        out[label] = {"single_decode_tok_s": result["single_decode_tok_s"],
                      "concurrent_tok_s": conc["throughput_tok_s"],
                      "itl_p50_ms": conc["itl_ms"].get("p50"), "itl_p99_ms": conc["itl_ms"].get("p99"),
                      "errors": result["single"]["errors"] + conc["errors"]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--competitor-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {**run_metadata("cpu"), "cpu": cpu_name(), "threads": torch.get_num_threads(),
               "competitor_threads": args.competitor_threads,
               "wait_policy": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")},
               "offline": offline(args), "serving": serving(args)}
    print(f"{results['cpu']}, {results['threads']} threads, competitor {args.competitor_threads} "
          f"threads, wait policy {results['wait_policy']}")
    for label in ("alone", "contended"):
        o, s = results["offline"][label], results["serving"][label]
        print(f"{label:10s} offline decode b1 {o['decode_b1_tok_s']:6.1f}  b16 "
              f"{o['decode_b16_tok_s']:6.1f} tok/s | serving: one stream {s['single_decode_tok_s']:6.1f}"
              f" tok/s, 16 streams {s['concurrent_tok_s']:6.1f} tok/s, ITL p50/p99 "
              f"{s['itl_p50_ms']:.0f}/{s['itl_p99_ms']:.0f} ms, errors {s['errors']}")
    if args.json:
        save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
