"""What a command line hands the engine, seen without loading a model."""

from __future__ import annotations

from collections.abc import Callable


def llm_arguments(monkeypatch, main: Callable[[list[str]], int], argv: list[str]) -> dict:
    """The keyword arguments main(argv) gives LLM(...), which stops it there: it raises a
    ValueError, which the CLIs report as one error line (exit 1)."""
    seen: dict = {}

    def refuse(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stopped before loading the model")

    monkeypatch.setattr("fastgen.entrypoints.llm.LLM", refuse)
    assert main(argv) == 1
    return seen
