"""fastgen-serve: serve a model over HTTP, OpenAI's API and Megatron-LM's, from one engine.

    fastgen-serve --model smollm2 --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2", "prompt": "The sky is", "max_tokens": 16}'

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, PUT /api and POST
/completions (Megatron-LM), GET /health, GET /metrics (Prometheus), and a chat page at / (open it
in a browser; --no-ui turns it off). Binds 127.0.0.1 unless told otherwise; with --api-key (or
FASTGEN_API_KEY) every route but /health and the chat page needs `Authorization: Bearer <key>`
(the page asks for it). The engine options are fastgen-run's, from the one list
EngineConfig.add_cli_args declares (defaults as in LLM()); the flags here are the server's own.

A bad flag or value, a model that cannot be loaded, or a port that cannot be bound prints one
line, `fastgen-serve: error: ...`, on stderr and exits with status 1 (2 for unusable arguments).
"""

from __future__ import annotations

import argparse
import inspect
import socket
import sys
from typing import TYPE_CHECKING

from fastgen.entrypoints.cli import Parser, UsageError, engine_config, run_cli

if TYPE_CHECKING:
    from fastgen.config import EngineConfig

PROG = "fastgen-serve"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def build_parser() -> argparse.ArgumentParser:
    from fastgen import envs
    from fastgen.config import EngineConfig
    from fastgen.engine.async_engine import AsyncLLMEngine
    from fastgen.server.app import DEFAULT_MAX_BODY_BYTES
    from fastgen.server.tools import TOOL_CALL_PARSERS

    waiting = inspect.signature(AsyncLLMEngine).parameters["max_waiting_requests"].default
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as \"model\" (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: 8000)")
    p.add_argument("--api-key", default=envs.api_key(),
                   help="require 'Authorization: Bearer <key>' on every route but /health "
                        "(default: $FASTGEN_API_KEY; unset: no key)")
    p.add_argument("--max-waiting-requests", type=int, default=waiting,
                   help=f"requests queued beyond the running batch before new ones get 503 "
                        f"(default: {waiting})")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"larger request bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--tool-call-parser", default="auto", choices=TOOL_CALL_PARSERS,
                   help="how tool calls are read from the model's output: hermes, llama3_json, "
                        "mistral, or auto (from the chat template; default)")
    p.add_argument("--no-ui", action="store_true",
                   help="do not serve the chat page at / (default: serve it)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="for fastgen's and uvicorn's logs (default: info)")
    return EngineConfig.add_cli_args(p)


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: _parse(argv), _serve)


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, EngineConfig]:
    """The command line and the engine's config. UsageError for a value no server or engine
    could use, before a model is loaded (the engine's are checked by from_cli_args)."""
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    for flag in ("max_waiting_requests", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got "
                             f"{getattr(args, flag)}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key must not be blank")
    return args, engine_config(args)


def _serve(parsed: tuple[argparse.Namespace, EngineConfig]) -> int:
    import logging

    import torch
    import uvicorn

    from fastgen.engine.async_engine import AsyncLLMEngine
    from fastgen.entrypoints.llm import LLM
    from fastgen.server.app import build_app

    from fastgen.engine import parallel

    args, config = parsed
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available")
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if parallel.is_torchrun_worker(config):  # rank 0 serves HTTP; this rank runs its shard
            parallel.serve_as_worker(config)
            return 0
    except ValueError as e:
        raise UsageError(str(e)) from None
    sock = _listen(args.host, args.port)  # before loading: a busy port fails in a second
    try:
        llm = LLM.from_engine_config(config)
        engine = AsyncLLMEngine(llm.engine, max_waiting_requests=args.max_waiting_requests)
        name = args.served_model_name or config.model
        app = build_app(engine, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                        tool_call_parser=args.tool_call_parser, ui=not args.no_ui,
                        start_engine=False)
        host, port = sock.getsockname()[:2]
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        page = "" if args.no_ui else f"chat page at {url}/, "
        print(f"{PROG}: serving {name!r} at {url} ({page}OpenAI API under /v1, Megatron-LM at "
              f"PUT /api, metrics at /metrics; context {llm.max_model_len} tokens, KV cache "
              f"{llm.engine.block_manager.num_blocks} blocks of {config.cache.block_size})",
              file=sys.stderr, flush=True)
        if args.api_key is None and not _is_loopback(host):
            logging.getLogger(PROG).warning("listening on %s without --api-key: anyone who can "
                                            "reach this port can use the model", host)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
        try:
            _run_beside(engine, server, sock)
        finally:
            llm.engine.close()  # its tensor-parallel workers stop too
    finally:
        sock.close()
    if engine.dead is not None:  # a tensor-parallel worker was lost: nothing left to serve with
        print(f"{PROG}: error: {engine.dead}", file=sys.stderr, flush=True)
        return 1
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
