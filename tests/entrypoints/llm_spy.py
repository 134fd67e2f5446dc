"""What a command line hands the engine, seen without loading a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields


def llm_arguments(monkeypatch, main: Callable[[list[str]], int], argv: list[str]) -> dict:
    """The engine settings main(argv) gives LLM, by field name (EngineConfig's and its nested
    configs', flat as LLM(**kwargs) takes them). LLM stops it there: it raises a ValueError,
    which the CLIs report as one error line (exit 1)."""
    seen: dict = {}

    class RefusingLLM:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise ValueError("stopped before loading the model")

        @classmethod
        def from_engine_config(cls, config):
            for part in (config, config.cache, config.parallel):
                seen.update({f.name: getattr(part, f.name) for f in fields(part)})
            raise ValueError("stopped before loading the model")

    monkeypatch.setattr("fastgen.entrypoints.llm.LLM", RefusingLLM)
    assert main(argv) == 1
    return seen
