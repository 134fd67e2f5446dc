"""What fastgen's command-line tools share: a user error is one stderr line and a non-zero exit
(2 for a bad command line, as argparse; 1 for anything else the user can fix), never a
traceback."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from fastgen import envs
from fastgen.errors import ModelLoadError

Parsed = TypeVar("Parsed")  # what a CLI's parse step hands its run step


class UsageError(Exception):
    """A bad command line; reported like argparse's own errors."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage too; one line is the contract
        raise UsageError(message)


def run_cli(prog: str, parse: Callable[[], Parsed], run: Callable[[Parsed], int]) -> int:
    """parse() the command line, then run(parsed); user errors become one line on stderr."""
    if not sys.stderr.isatty():
        envs.disable_progress_bars()  # no progress bars in logs and pipes; before torch loads
    try:
        parsed = parse()
    except UsageError as e:
        return fail(prog, str(e), status=2)
    try:
        status = run(parsed)
    except (ModelLoadError, ValueError, UsageError) as e:
        status = fail(prog, str(e))
    except KeyboardInterrupt:
        status = 130
    if envs.torchrun_world_size() > 1:
        leave_now(status)
    return status


def leave_now(status: int) -> NoReturn:
    """Ends a torchrun rank whose work is done: the atexit handlers run (rank 0's engine tells
    its tensor-parallel workers to stop), output is flushed, and the process exits without the
    interpreter's shutdown. That shutdown destroys torch.distributed's gloo process group from a
    static destructor while the group's C++ threads may still hold Python objects; a thread
    that then needs the GIL of a finalizing interpreter is unwound out of a noexcept frame, and
    the process aborts ("terminate called without an active exception", SIGABRT), which fails
    the whole torchrun job after its work succeeded. It happened about once in 20 two-rank jobs
    here."""
    atexit._run_exitfuncs()  # while the interpreter is whole, as a normal exit would
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(status)


def engine_config(args: argparse.Namespace):
    """The EngineConfig of the engine flags (EngineConfig.add_cli_args) in args; a value no
    engine can use is a UsageError naming its flag."""
    from fastgen.config import EngineConfig

    try:
        return EngineConfig.from_cli_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None


def fail(prog: str, message: str, status: int = 1) -> int:
    lines = message.strip().splitlines() or ["failed"]
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    return status
