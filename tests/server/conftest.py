"""A real fastgen server on loopback for the server tests: uvicorn in a thread, serving the tiny
float32 Llama, on a port the OS picked. `server` is a module-scoped fixture factory so a test
module can start one with its own options (API key, queue limit, ...)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from fastgen.engine.async_engine import AsyncLLMEngine
from fastgen.server.app import build_app
from tests.engine.test_continuous_batching import make_llm
from tests.engine.tiny_model import save_tiny_llama

MODEL_NAME = "tiny-llama"


def slow_down(llm, step_delay: float) -> None:
    """Adds step_delay seconds to every engine step of llm: a slow model, for tests that must
    catch a request in flight."""
    run = llm.engine.model_runner.execute

    def slow_run(batch, *masks):
        time.sleep(step_delay)
        return run(batch, *masks)

    llm.engine.model_runner.execute = slow_run


@dataclass
class RunningServer:
    url: str             # http://127.0.0.1:PORT
    engine: AsyncLLMEngine
    tokenizer: object

    @property
    def llm_engine(self):
        return self.engine.engine


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-server"))


@pytest.fixture(scope="module")
def start_server(tiny_model_path):
    """start_server(**options) -> RunningServer; options go to build_app (api_key,
    max_body_bytes, tool_call_parser, ui), max_waiting_requests to the AsyncLLMEngine, step_delay (seconds added to
    every engine step: a slow model, for tests that must catch a request in flight) to the
    model runner, model_path (default: the tiny model) and anything else to LLM()."""
    started = []

    def start(api_key=None, max_body_bytes=None, max_waiting_requests=1024, step_delay=0.0,
              model_path=None, tool_call_parser="auto", ui=True, **llm_options):
        llm = make_llm(model_path or tiny_model_path, **llm_options)
        if step_delay:
            slow_down(llm, step_delay)
        engine = AsyncLLMEngine(llm.engine, max_waiting_requests=max_waiting_requests)
        options = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
        options["tool_call_parser"] = tool_call_parser
        options["ui"] = ui
        app = build_app(engine, MODEL_NAME, api_key=api_key, **options)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        started.append((server, thread, sock))
        return RunningServer(url, engine, llm.tokenizer)

    yield start
    for server, thread, sock in started:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(start_server) -> RunningServer:
    """A server with default options."""
    return start_server()
