"""fastgen-eval: score a generated parquet file as verl's main_eval does, with pass@k and
majority vote.

    fastgen-eval gsm8k_generated.parquet
    fastgen-eval data.path=gen.parquet data.response_key=responses --json scores.json
    fastgen-eval data.path=gen.parquet custom_reward_function.path=my_reward.py \\
        custom_reward_function.name=compute_score

Each row needs a list of responses, a data source and reward_model.ground_truth (the file
fastgen-generate writes from verl's GSM8K / MATH data). The reward is chosen by data source:
openai/gsm8k and gsm8k take the number after "####"; lighteval/MATH,
DigitalLearningGmbH/MATH-lighteval, HuggingFaceH4/MATH-500 and math take the last \\boxed{}
answer. A custom reward function, fn(data_source, solution_str, ground_truth, extra_info=None)
returning a number or a dict with "score" (and optionally "acc", "pred"), scores every row instead.

verl's dotted keys and the plain flags are the same options: data.path (--data-path),
data.response_key, data.data_source_key, data.reward_model_key, custom_reward_function.path
(--reward-path) and custom_reward_function.name (--reward-name); ray_init.num_cpus and
data.use_shm are accepted and ignored (scoring runs in this process).

Prints, per data source: rows scored, rows skipped (no responses: prompts rejected as too long),
responses per row (n), the mean score (verl's test_score/<data_source>), pass@k for
k = 1, 2, 4, ... and n, and maj@n. A user error (missing
file or column, unknown data source, broken reward file) prints one line on stderr and exits 1
(2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import re

from fastgen.entrypoints.cli import Parser, UsageError, run_cli

PROG = "fastgen-eval"

DOTTED_KEYS = {
    "data.path": "--data-path",
    "data.response_key": "--response-key",
    "data.data_source_key": "--data-source-key",
    "data.reward_model_key": "--reward-model-key",
    "custom_reward_function.path": "--reward-path",
    "custom_reward_function.name": "--reward-name",
}
IGNORED_KEYS = frozenset({"ray_init.num_cpus", "ray_init.allow_external_dashboard", "data.use_shm"})
_DOTTED = re.compile(r"^\+{0,2}([A-Za-z_]\w*(?:\.\w+)+)=(.*)$", re.DOTALL)


def build_parser() -> argparse.ArgumentParser:
    from fastgen.evaluation import EvalConfig

    defaults = EvalConfig(data_path="")
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("path", nargs="?", help="the generated parquet file (or data.path=...)")
    p.add_argument("--data-path", help="the generated parquet file")
    p.add_argument("--response-key", default=defaults.response_key,
                   help=f"column of response lists (default: {defaults.response_key})")
    p.add_argument("--data-source-key", default=defaults.data_source_key,
                   help="column naming each row's data source "
                   f"(default: {defaults.data_source_key})")
    p.add_argument("--reward-model-key", default=defaults.reward_model_key,
                   help="struct column holding ground_truth "
                   f"(default: {defaults.reward_model_key})")
    p.add_argument("--reward-path", help="Python file with a custom reward function")
    p.add_argument("--reward-name", default=defaults.custom_reward_name,
                   help="the function's name in that file "
                   f"(default: {defaults.custom_reward_name})")
    p.add_argument("--gsm8k-method", default=defaults.gsm8k_method, choices=["strict", "flexible"],
                   help="strict: the number after the last '####'; flexible: the last number "
                   f"(default: {defaults.gsm8k_method})")
    p.add_argument("--format-score", type=float, default=defaults.format_score,
                   help="GSM8K score for a well-formed but wrong answer, as verl's format_score "
                   f"(default: {defaults.format_score})")
    p.add_argument("--correct-threshold", type=float, default=defaults.correct_threshold,
                   help="a custom reward's score that counts as correct for pass@k and maj@n "
                   f"when it returns no 'acc' (default: {defaults.correct_threshold})")
    p.add_argument("--json", metavar="PATH",
                   help="also write the report as JSON to PATH "
                   "('-': print the JSON instead of the table)")
    return p


def translate_dotted(argv: list[str]) -> list[str]:
    """verl's `key=value` overrides as the equivalent flags; unknown keys are a usage error."""
    out = []
    for token in argv:
        match = _DOTTED.match(token)
        if match is None:
            out.append(token)
            continue
        key, value = match.groups()
        if key not in DOTTED_KEYS and key not in IGNORED_KEYS:
            raise UsageError(f"unknown key {key!r} (known: {', '.join(sorted(DOTTED_KEYS))})")
        if key in DOTTED_KEYS and value not in ("null", "None", "~"):  # Hydra's null: the default
            out += [DOTTED_KEYS[key], value]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import sys

    args = build_parser().parse_args(translate_dotted(sys.argv[1:] if argv is None else argv))
    if args.path and args.data_path and args.path != args.data_path:
        raise UsageError(f"two input files given: {args.path} and {args.data_path}")
    args.data_path = args.data_path or args.path
    if not args.data_path:
        raise UsageError("no input file: pass data.path=FILE (or --data-path FILE)")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: parse_args(argv), _run)


def _run(args: argparse.Namespace) -> int:
    from fastgen.evaluation import EvalConfig, evaluate
    from fastgen.evaluation.eval import write_json

    report = evaluate(EvalConfig(
        data_path=args.data_path, response_key=args.response_key,
        data_source_key=args.data_source_key, reward_model_key=args.reward_model_key,
        custom_reward_path=args.reward_path, custom_reward_name=args.reward_name,
        gsm8k_method=args.gsm8k_method, format_score=args.format_score,
        correct_threshold=args.correct_threshold))
    if args.json == "-":
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(report.table())
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
