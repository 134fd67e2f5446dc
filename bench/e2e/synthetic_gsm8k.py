"""A GSM8K-shaped parquet file, made up here: the schema verl's GSM8K preprocessing writes
(`data_source`, `prompt` as a chat list with verl's instruction, `ability`, `reward_model` with
`style` and `ground_truth`, `extra_info`), with grade-school word problems generated from
templates and their true answers, so generation and evaluation can be run and timed without
downloading the dataset.

    python bench/e2e/synthetic_gsm8k.py --rows 64 --output gsm8k_sample.parquet
"""

from __future__ import annotations

import argparse
import random

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'

# (question template, answer from the drawn numbers)
TEMPLATES = [
    ("{name} sold clips to {a} friends in April, and then half as many clips in "
     "May. How many clips did {name} sell altogether in April and May?",
     lambda a, b, c: a + a // 2, {"a": "even"}),
    ("{name} has {a} apples and buys {b} more bags with {c} apples in each bag. How many apples "
     "are there now?", lambda a, b, c: a + b * c, {}),
    ("A train travels {a} kilometers per hour for {b} hours, then {c} kilometers more. How many "
     "kilometers does it travel in all?", lambda a, b, c: a * b + c, {}),
    ("{name} earns ${a} an hour and works {b} hours a day for {c} days. How many dollars does "
     "{name} earn?", lambda a, b, c: a * b * c, {}),
    ("There are {a} students in a class. {b} of them go home early and {c} new students arrive. "
     "How many students are in the class now?", lambda a, b, c: a - b + c, {"b": "below_a"}),
]
NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Mark", "Ken", "Alexis", "Tina"]


def make_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        template, answer, rules = TEMPLATES[index % len(TEMPLATES)]
        a, b, c = rng.randint(10, 90), rng.randint(2, 9), rng.randint(2, 12)
        if rules.get("a") == "even":
            a -= a % 2
        if rules.get("b") == "below_a":
            b = rng.randint(1, a - 1)
        question = template.format(name=rng.choice(NAMES), a=a, b=b, c=c)
        rows.append({
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(answer(a, b, c))},
            "extra_info": {"split": "test", "index": index, "question": question},
        })
    return rows


def write_parquet(rows: list[dict], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="gsm8k_sample.parquet")
    args = parser.parse_args()
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    write_parquet(make_rows(args.rows, args.seed), args.output)
    print(f"wrote {args.rows} GSM8K-format rows to {args.output}")


if __name__ == "__main__":
    main()
