"""fastgen-generate: sample responses for every prompt of a parquet file, as verl's generation
job does, and save them beside the input's columns.

    fastgen-generate data.path=test.parquet data.output_path=out.parquet model.path=smollm2 \
        data.n_samples=4 rollout.temperature=1.0 rollout.top_k=50 rollout.top_p=0.7
    fastgen-generate --data test.parquet --output out.parquet --n-samples 4 --config job.yaml
    torchrun --nproc-per-node 8 -m fastgen.entrypoints.generate data.path=... (data parallel)

Keys are verl's dotted names (KEY=VALUE, Hydra's +KEY=VALUE too) or the flags below; --config
reads a YAML file of the same keys (nested, as verl's generation.yaml), which the command line
overrides. Results are saved in parts in <output>.parts/ as they finish; the same command run
again after a crash (even kill -9) resumes there. A bad key, file or column prints one line,
`fastgen-generate: error: ...`, on stderr before any model is loaded (exit 2 for the command
line, 1 otherwise).
"""

from __future__ import annotations

import argparse
import re
import sys

from fastgen.entrypoints.cli import Parser, UsageError, run_cli

PROG = "fastgen-generate"
_OVERRIDE = re.compile(r"\+{0,2}[A-Za-z_][\w.]*=")


def build_parser() -> argparse.ArgumentParser:
    from fastgen.generation.config import KEYS

    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--config", metavar="FILE", help="YAML file of config keys")
    for key in KEYS:
        help_text = f"{key.name}: {key.help} (default: {key.default_text or key.default})"
        if key.type is bool:
            p.add_argument(key.flag, dest=key.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(key.flag, dest=key.name, type=key.type, choices=key.choices,
                           metavar=None if key.choices else key.name.rsplit(".", 1)[1].upper(),
                           default=argparse.SUPPRESS, help=help_text)
    return p


def split_argv(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(flags for argparse, KEY=VALUE overrides). A flag's value is never taken for an
    override, even when it holds '='."""
    takes_value = {option for action in parser._actions if action.nargs != 0
                   for option in action.option_strings}
    flags, overrides = [], []
    tokens = iter(argv)
    for token in tokens:
        if token in takes_value:
            flags += [token, next(tokens, "")]
        elif not token.startswith("-") and _OVERRIDE.match(token):
            overrides.append(token)
        else:
            flags.append(token)
    return flags, overrides


def parse(argv: list[str] | None):
    """The resolved JobConfig; UsageError for any bad key, value or config file."""
    from fastgen.generation.config import ConfigError, read_yaml, resolve, split_override

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    flags, overrides = split_argv(argv, parser)
    args = vars(parser.parse_args(flags))
    config_file = args.pop("config")
    try:
        given = dict(split_override(o) for o in overrides)
        given.update(args)  # flags given explicitly (the rest are SUPPRESSed)
        return resolve(read_yaml(config_file) if config_file else {}, given)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: parse(argv), _run)


def _run(config) -> int:
    from fastgen.generation import job
    from fastgen.generation.distributed import layout_from_env

    layout = layout_from_env(config["rollout.tensor_model_parallel_size"])
    summary = job.run(config, layout)
    if summary is not None:
        job.say(summary.line(config["rollout.prompt_length"], config["data.truncation"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
