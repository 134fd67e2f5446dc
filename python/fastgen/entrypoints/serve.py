"""fastgen-serve: serve a model over HTTP, OpenAI's API and Megatron-LM's, from one engine.

    fastgen-serve --model smollm2 --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2", "prompt": "The sky is", "max_tokens": 16}'

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, PUT /api (Megatron-LM),
GET /health, GET /metrics (Prometheus). Binds 127.0.0.1 unless told otherwise; with --api-key (or
FASTGEN_API_KEY) every route but /health needs `Authorization: Bearer <key>`. Engine defaults come
from EngineConfig and CacheConfig, as for fastgen-run and LLM().

A bad flag or value, a model that cannot be loaded, or a port that cannot be bound prints one
line, `fastgen-serve: error: ...`, on stderr and exits with status 1 (2 for unusable arguments).
"""

from __future__ import annotations

import argparse
import inspect
import os
import socket
import sys

from fastgen.entrypoints.cli import Parser, UsageError, run_cli

PROG = "fastgen-serve"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def build_parser() -> argparse.ArgumentParser:
    from fastgen.config import CacheConfig, EngineConfig
    from fastgen.engine.async_engine import AsyncLLMEngine
    from fastgen.server.app import DEFAULT_MAX_BODY_BYTES

    engine, cache = EngineConfig(), CacheConfig()
    waiting = inspect.signature(AsyncLLMEngine).parameters["max_waiting_requests"].default
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", default=engine.model,
                   help=f"model name, Hugging Face folder, or .gguf file (default: {engine.model})")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as \"model\" (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("FASTGEN_API_KEY") or None,
                   help="require 'Authorization: Bearer <key>' on every route but /health "
                        "(default: $FASTGEN_API_KEY; unset: no key)")
    p.add_argument("--dtype", default=engine.dtype,
                   help=f"bfloat16, float16 or float32 (default: {engine.dtype})")
    p.add_argument("--device", default=engine.device, choices=["auto", "cpu", "cuda"],
                   help=f"(default: {engine.device}: CUDA when there is one)")
    p.add_argument("--max-model-len", type=int, default=engine.max_model_len,
                   help="context length, prompt plus output (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=engine.max_num_seqs,
                   help=f"most sequences in the running batch (default: {engine.max_num_seqs})")
    p.add_argument("--max-num-batched-tokens", type=int, default=engine.max_num_batched_tokens,
                   help=f"most tokens one engine step feeds the model; longer prompts are "
                        f"prefilled in chunks (default: {engine.max_num_batched_tokens})")
    p.add_argument("--block-size", type=int, default=cache.block_size,
                   help=f"tokens per KV-cache block (default: {cache.block_size})")
    p.add_argument("--cpu-kv-cache-gib", type=float, default=cache.cpu_kv_cache_gib,
                   help=f"on CPU, memory for the KV cache (default: {cache.cpu_kv_cache_gib})")
    p.add_argument("--gpu-memory-utilization", type=float, default=cache.gpu_memory_utilization,
                   help=f"on CUDA, the fraction of device memory the engine may use, KV cache "
                        f"included (default: {cache.gpu_memory_utilization})")
    p.add_argument("--enforce-eager", action="store_true",
                   help="turn CUDA graphs off: decode steps launch their kernels one by one (for "
                        "debugging; no effect on CPU, where nothing is captured)")
    caching = p.add_mutually_exclusive_group()
    caching.add_argument("--enable-prefix-caching", dest="enable_prefix_caching",
                         action="store_true", default=cache.enable_prefix_caching,
                         help="share the KV cache of equal prompt prefixes (default: on)")
    caching.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                         action="store_false", help="turn prefix caching off")
    p.add_argument("--max-waiting-requests", type=int, default=waiting,
                   help=f"requests queued beyond the running batch before new ones get 503 "
                        f"(default: {waiting})")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"larger request bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="for fastgen's and uvicorn's logs (default: info)")
    return p


def main(argv: list[str] | None = None) -> int:
    def parse() -> argparse.Namespace:
        args = build_parser().parse_args(argv)
        _check(args)
        return args

    return run_cli(PROG, parse, _serve)


def _check(args: argparse.Namespace) -> None:
    """Refuses values no engine could use, before a model is loaded."""
    from fastgen.config import parse_dtype

    try:
        parse_dtype(args.dtype)
    except ValueError as e:
        raise UsageError(f"--dtype: {e}") from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    for flag in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting_requests",
                 "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got "
                             f"{getattr(args, flag)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UsageError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if not args.cpu_kv_cache_gib > 0:
        raise UsageError(f"--cpu-kv-cache-gib must be > 0, got {args.cpu_kv_cache_gib}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise UsageError(f"--gpu-memory-utilization must be in (0, 1], got "
                         f"{args.gpu_memory_utilization}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key must not be blank")


def _serve(args: argparse.Namespace) -> int:
    import logging

    import torch
    import uvicorn

    from fastgen.engine.async_engine import AsyncLLMEngine
    from fastgen.entrypoints.llm import LLM
    from fastgen.server.app import build_app

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available")
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = _listen(args.host, args.port)  # before loading: a busy port fails in a second
    try:
        llm = LLM(args.model, dtype=args.dtype, device=args.device,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                  cpu_kv_cache_gib=args.cpu_kv_cache_gib,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  enable_prefix_caching=args.enable_prefix_caching,
                  enforce_eager=args.enforce_eager)
        engine = AsyncLLMEngine(llm.engine, max_waiting_requests=args.max_waiting_requests)
        name = args.served_model_name or args.model
        app = build_app(engine, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                        start_engine=False)
        host, port = sock.getsockname()[:2]
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        print(f"{PROG}: serving {name!r} at {url} (OpenAI API under /v1, Megatron-LM at "
              f"PUT /api, metrics at /metrics; context {llm.max_model_len} tokens, KV cache "
              f"{llm.engine.block_manager.num_blocks} blocks of {args.block_size})",
              file=sys.stderr, flush=True)
        if args.api_key is None and not _is_loopback(host):
            logging.getLogger(PROG).warning("listening on %s without --api-key: anyone who can "
                                            "reach this port can use the model", host)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
        _run_beside(engine, server, sock)
    finally:
        sock.close()
    return 0


def _run_beside(engine, server, sock: socket.socket) -> None:
    """The engine loop on this (the main) thread, which loaded the model, and the HTTP server on
    another (see AsyncLLMEngine on why the thread matters). SIGINT or SIGTERM stops both; so does
    the server thread ending."""
    import signal
    import threading

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    thread = threading.Thread(target=http, name="fastgen-http", daemon=True)
    thread.start()
    try:
        engine.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket for host:port (port 0: one the OS picks); UsageError when it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    sys.exit(main())
