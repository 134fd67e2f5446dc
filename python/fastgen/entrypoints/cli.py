"""What fastgen's command-line tools share: a user error is one stderr line and a non-zero exit
(2 for a bad command line, as argparse; 1 for anything else the user can fix), never a
traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from fastgen.errors import ModelLoadError


class UsageError(Exception):
    """A bad command line; reported like argparse's own errors."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage too; one line is the contract
        raise UsageError(message)


def run_cli(prog: str, parse: Callable[[], argparse.Namespace],
            run: Callable[[argparse.Namespace], int]) -> int:
    """parse() the command line, then run(args); user errors become one line on stderr."""
    if not sys.stderr.isatty():
        # No progress bars in logs and pipes. Set before torch is imported: it imports tqdm,
        # which reads its TQDM_* settings once, at import.
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        args = parse()
    except UsageError as e:
        return fail(prog, str(e), status=2)
    try:
        return run(args)
    except (ModelLoadError, ValueError, UsageError) as e:
        return fail(prog, str(e))
    except KeyboardInterrupt:
        return 130


def fail(prog: str, message: str, status: int = 1) -> int:
    lines = message.strip().splitlines() or ["failed"]
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    return status
