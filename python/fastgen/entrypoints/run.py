"""fastgen-run: answer prompts from the command line.

    fastgen-run --prompt "What is the capital of France?"
    echo "Once upon a time" | fastgen-run --no-chat --max-tokens 64 --temperature 0
    fastgen-run --prompt "Hi" --prompt "Name a prime" --json
    fastgen-run --backend hf --prompt "Hi"         # the same request through HF transformers

Prompts are sent as a user message through the model's chat template unless --no-chat. One prompt
on a terminal streams its answer token by token; several are generated as one batch and printed
in order; --json prints one object per prompt per line ({"prompt", "text", "token_ids",
"finish_reason"}). Defaults come from EngineConfig and SamplingParams: sampling at temperature 1.0
(vLLM's default; pass --temperature 0 for greedy answers), up to 256 new tokens. The engine
options are fastgen-serve's, from the one list EngineConfig.add_cli_args declares.

A user error (unknown model, unreadable checkpoint, bad option value, a prompt longer than the
context) prints one line, `fastgen-run: error: ...`, on stderr and exits with status 1 (2 for
unusable arguments); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from fastgen.entrypoints.cli import Parser, UsageError, engine_config, run_cli

if TYPE_CHECKING:  # imported lazily at run time, so --help and usage errors stay fast
    from fastgen.config import EngineConfig, SamplingParams

PROG = "fastgen-run"


def build_parser() -> argparse.ArgumentParser:
    from fastgen.config import EngineConfig, SamplingParams

    sampling = SamplingParams()
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeat for several); with none, one prompt is read from stdin")
    p.add_argument("--max-tokens", type=int, default=sampling.max_tokens,
                   help=f"most new tokens per prompt (default: {sampling.max_tokens})")
    p.add_argument("--temperature", type=float, default=sampling.temperature,
                   help=f"0 means greedy (default: {sampling.temperature})")
    p.add_argument("--top-k", type=int, default=sampling.top_k, help="sample from the k most "
                   "likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=sampling.top_p, help="sample from the smallest "
                   "set of tokens with probability mass >= p (default: off)")
    p.add_argument("--seed", type=int, default=sampling.seed,
                   help="makes sampling reproducible (default: none)")
    p.add_argument("--no-chat", action="store_true",
                   help="complete the raw prompt instead of answering it as a chat message")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt per line")
    p.add_argument("--backend", default="fastgen", choices=["fastgen", "hf"],
                   help="fastgen, or Hugging Face transformers as a baseline (default: fastgen)")
    return EngineConfig.add_cli_args(p)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: _parse(argv), _run)


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, EngineConfig]:
    """The command line and the engine's config; UsageError for a bad flag or value."""
    args = build_parser().parse_args(argv)
    return args, engine_config(args)


def _run(parsed: tuple[argparse.Namespace, EngineConfig]) -> int:
    import torch

    from fastgen.config import SamplingParams

    from fastgen.engine import parallel

    args, config = parsed
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available")
    try:
        if parallel.is_torchrun_worker(config):  # rank 0 answers; this rank runs its shard
            parallel.serve_as_worker(config)
            return 0
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    prompts = args.prompt or [_read_stdin()]
    if args.backend == "hf":
        outputs = _run_hf(args, config, prompts, params)
    else:
        outputs = _run_fastgen(args, config, prompts, params)
    if outputs is not None:
        _print(args, prompts, outputs)
    return 0


def _read_stdin() -> str:
    prompt = sys.stdin.read().strip()
    if not prompt:
        raise UsageError("no prompt: pass --prompt or write one on stdin")
    return prompt


def _run_fastgen(args, config: EngineConfig, prompts: list[str], params: SamplingParams):
    from fastgen.entrypoints.llm import LLM
    from fastgen.outputs import RequestOutputKind
    from fastgen.tokenization import render_chat

    llm = LLM.from_engine_config(config)
    stream = len(prompts) == 1 and not args.json and sys.stdout.isatty()
    if not stream:
        if args.no_chat:
            return llm.generate(prompts, params, use_tqdm=False)
        return llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                        use_tqdm=False)
    tokenizer = llm.tokenizer
    if args.no_chat:
        ids = tokenizer.encode(prompts[0])
    else:
        ids = render_chat(tokenizer, [{"role": "user", "content": prompts[0]}])
    for out in llm.engine.stream(ids, params, prompts[0], RequestOutputKind.DELTA):
        sys.stdout.write(out.delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return None


def _run_hf(args, config: EngineConfig, prompts: list[str], params: SamplingParams):
    import torch

    from fastgen import loader
    from fastgen.entrypoints.hf_backend import HFBackend

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = loader.resolve_model(config.model)
    backend = HFBackend(model_dir, config.dtype, device)
    return backend.generate(prompts, params, chat=not args.no_chat)


def _print(args, prompts: list[str], outputs) -> None:
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason.value}, ensure_ascii=False))
        elif len(outputs) == 1:
            print(out.text)
        else:
            print(f"> {prompt}\n{out.text}\n")


if __name__ == "__main__":
    sys.exit(main())
