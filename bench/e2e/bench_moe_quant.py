"""Quantized mixture-of-experts weights against float ones, same run: a Qwen3-MoE-shaped model
with random weights (default: 8 layers, hidden 1024, 16 experts of 512, top 4) in --dtype, its
experts (and linear layers) as float weights through the fused_moe kernel, and the same model
with --quantization int8, whose experts stay packed (Q8_0 blocks) and run through the quantized
kernels in one op per layer (ops.quant_fused_moe, captured in step graphs), and that model again
with the op's Python predecessor (the experts one by one through quantized_linear, eagerly: the
path experts of mixed types still take). Reports the weight bytes and decode tokens/s at batch 1
and 16.

    python bench/e2e/bench_moe_quant.py --json bench/results/cpu-moe-quant-DATE.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from fastgen import LLM, SamplingParams, quantization

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import Timer, add_output_options, cpu_name, run_metadata, save_json
from bench.e2e.presets import synthetic_model_dir


def config(args) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": 8192, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
            "moe_intermediate_size": args.expert_size, "num_experts": args.experts,
            "num_experts_per_tok": args.top_k, "norm_topk_prob": True,
            "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
            "num_key_value_heads": max(1, args.hidden // 256), "head_dim": 64,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16"}


def weight_bytes(llm: LLM) -> int:
    total = 0
    for param in llm.engine.model_runner.model.parameters():
        for weight in getattr(param, "experts", [param]):
            packed = getattr(weight, "packed", None)
            total += packed.nbytes if packed is not None else weight.numel() * weight.element_size()
    return total


def decode_rate(llm: LLM, batch: int, tokens: int, trials: int) -> float:
    prompts = [[5 + i, 17, 42, 99, 3 + i, 7] for i in range(batch)]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    clock = Timer("cpu")
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(trials):
        start = clock.now()
        llm.generate(prompts, params, use_tqdm=False)
        best = max(best, batch * tokens / (clock.now() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-size", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    add_output_options(parser)
    args = parser.parse_args()
    results = {**run_metadata("cpu"), "cpu": cpu_name(), "config": config(args),
               "dtype": args.dtype, "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        synthetic_model_dir(config(args), Path(folder))
        for name, method in (("float", None), ("int8", "int8"), ("int8 loop", "int8")):
            llm = LLM(folder, dtype=args.dtype, device="cpu", load_format="random",
                      quantization=method, max_num_seqs=max(args.batches))
            if name == "int8 loop":  # unstacked: fastgen.layers.moe's per-expert fallback
                for param in llm.engine.model_runner.model.parameters():
                    if isinstance(param, quantization.QuantizedExperts):
                        param.stacked = None
            run = {"weight_bytes": weight_bytes(llm)}
            if method is not None:
                run["packed"] = quantization.describe(llm.engine.model_runner.model)
            for batch in args.batches:
                run[f"decode_b{batch}_tok_s"] = decode_rate(llm, batch, args.tokens, args.trials)
            results["runs"][name] = run
            llm.engine.close()
            del llm
    float_run, int8_run = results["runs"]["float"], results["runs"]["int8"]
    print(f"{results['cpu']}; {args.layers} layers, {args.experts} experts of "
          f"{args.expert_size}, top {args.top_k}, hidden {args.hidden}")
    for name, run in results["runs"].items():
        rates = ", ".join(f"batch {b}: {run[f'decode_b{b}_tok_s']:.1f} tok/s"
                          for b in args.batches)
        print(f"  {name:9s} {run['weight_bytes'] / 2**20:8.1f} MiB   {rates}")
    loop_run = results["runs"]["int8 loop"]
    for batch in args.batches:
        key = f"decode_b{batch}_tok_s"
        print(f"  int8 / float at batch {batch}: {int8_run[key] / float_run[key]:.2f}x; "
              f"int8 / int8 loop: {int8_run[key] / loop_run[key]:.2f}x")
    if args.json:
        save_json(args.json, results)


if __name__ == "__main__":
    main()
