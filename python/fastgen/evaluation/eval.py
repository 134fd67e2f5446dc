"""Scoring a generated parquet file the way verl's `main_eval` does, plus pass@k and majority vote.

Each row holds `responses` (n strings), a `data_source` and `reward_model.ground_truth` (verl's
data format; the three column names are configurable). Every response is judged by the reward
for its data source (rewards.py) or by one user reward for all rows; per data source we report

    mean score   per row the mean reward of its responses, then the mean over rows (verl's
                 `test_score/<data_source>`)
    pass@k       the unbiased estimator, averaged over rows, for k = 1, 2, 4, ... below n, and n
    maj@n        the share of rows whose most common answer is correct (when n > 1)

Rows without responses (prompts fastgen-generate rejected as too long) are left out of these and
counted as `skipped`.

A response counts as correct when its reward says so (built-in rules; a user reward's "acc"),
else when its score is at least `correct_threshold`. All input problems (a missing file or
column, a malformed row, a data source with no reward) raise `EvalError` with one line to show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastgen.evaluation.metrics import majority_vote, mean, pass_at_k, pass_at_k_values
from fastgen.evaluation.rewards import (BUILTIN_REWARDS, Judgement, Reward, RewardError,
                                        RuleRewards, load_custom_reward)

EXTRA_INFO_KEY = "extra_info"  # passed to a user reward when the file has it, as verl


class EvalError(ValueError):
    """A problem with the input or the reward; the message is one line for the user."""


@dataclass(frozen=True)
class EvalConfig:
    data_path: str
    response_key: str = "responses"
    data_source_key: str = "data_source"
    reward_model_key: str = "reward_model"
    custom_reward_path: str | None = None
    custom_reward_name: str = "compute_score"
    gsm8k_method: str = "strict"
    format_score: float = 0.0
    correct_threshold: float = 1.0


@dataclass(frozen=True)
class Row:
    data_source: str
    responses: list[str]
    ground_truth: Any
    extra_info: Any = None


@dataclass(frozen=True)
class SourceReport:
    data_source: str
    rows: int  # scored: with at least one response
    skipped: int  # without responses
    samples_min: int  # responses per row; rows may differ, and pass@k stops at the fewest
    samples_max: int
    mean_score: float
    pass_at_k: dict[int, float]
    majority: float | None  # maj@n; None for n = 1 or a reward that gives no answers

    @property
    def samples(self) -> str:
        if self.samples_min == self.samples_max:
            return str(self.samples_min)
        return f"{self.samples_min}-{self.samples_max}"


@dataclass(frozen=True)
class EvalReport:
    path: str
    sources: list[SourceReport] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat metric names, verl's `test_score/<data_source>` among them."""
        out: dict[str, float] = {}
        for s in self.sources:
            out[f"test_score/{s.data_source}"] = s.mean_score
            out.update({f"pass@{k}/{s.data_source}": v for k, v in s.pass_at_k.items()})
            if s.majority is not None:
                out[f"maj@{s.samples}/{s.data_source}"] = s.majority
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "metrics": self.metrics(),
            "sources": [{
                "data_source": s.data_source, "rows": s.rows, "skipped": s.skipped,
                "samples_min": s.samples_min,
                "samples_max": s.samples_max, "mean_score": s.mean_score,
                "pass_at_k": {str(k): v for k, v in s.pass_at_k.items()}, "majority": s.majority,
            } for s in self.sources],
        }

    def table(self) -> str:
        ks = sorted({k for s in self.sources for k in s.pass_at_k})
        header = (["data source", "rows", "skipped", "n", "score"] + [f"pass@{k}" for k in ks]
                  + ["maj@n"])
        lines = [header]
        for s in self.sources:
            lines.append([s.data_source, str(s.rows), str(s.skipped), s.samples,
                          f"{s.mean_score:.4f}"]
                         + [f"{s.pass_at_k[k]:.4f}" if k in s.pass_at_k else "-" for k in ks]
                         + ["-" if s.majority is None else f"{s.majority:.4f}"])
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
                         for line in lines)


def read_rows(config: EvalConfig) -> list[Row]:
    """The rows of the generated file, checked: every column present, every row well formed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(config.data_path)
    if not path.is_file():
        raise EvalError(f"no such file: {path}")
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise EvalError(f"cannot read {path} as parquet: {e}") from e
    keys = {"data.response_key": config.response_key,
            "data.data_source_key": config.data_source_key,
            "data.reward_model_key": config.reward_model_key}
    for option, key in keys.items():
        if key not in names:
            raise EvalError(f"{path} has no column {key!r} ({option}); "
                            f"its columns: {', '.join(names)}")
    columns = list(keys.values()) + ([EXTRA_INFO_KEY] if EXTRA_INFO_KEY in names else [])
    records = pq.read_table(path, columns=columns).to_pylist()
    if not records:
        raise EvalError(f"{path} has no rows")
    return [_row(i, record, config) for i, record in enumerate(records)]


def _row(i: int, record: dict[str, Any], config: EvalConfig) -> Row:
    responses = record[config.response_key]
    if isinstance(responses, str):  # one response stored as a plain string
        responses = [responses]
    if responses is None:  # a rejected prompt
        responses = []
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise EvalError(f"row {i}: column {config.response_key!r} must hold lists of strings, "
                        f"got {responses!r:.80}")
    reward_data = record[config.reward_model_key]
    if not isinstance(reward_data, dict) or reward_data.get("ground_truth") is None:
        raise EvalError(f"row {i}: column {config.reward_model_key!r} has no 'ground_truth'")
    data_source = record[config.data_source_key]
    if not isinstance(data_source, str):
        raise EvalError(f"row {i}: column {config.data_source_key!r} must be a string, "
                        f"got {data_source!r:.80}")
    return Row(data_source, list(responses), reward_data["ground_truth"],
               record.get(EXTRA_INFO_KEY))


def make_reward(config: EvalConfig) -> Reward:
    if config.custom_reward_path:
        return load_custom_reward(config.custom_reward_path, config.custom_reward_name)
    return RuleRewards(config.gsm8k_method, config.format_score)


def evaluate(config: EvalConfig) -> EvalReport:
    """Reads, scores and summarises the file; data sources in order of first appearance."""
    try:
        reward = make_reward(config)
    except RewardError as e:
        raise EvalError(str(e)) from e
    rows = read_rows(config)
    unknown = sorted({row.data_source for row in rows if not reward.supports(row.data_source)})
    if unknown:
        raise EvalError(f"no built-in reward for data_source {', '.join(map(repr, unknown))} "
                        f"(built-in: {', '.join(sorted(BUILTIN_REWARDS))}); pass "
                        "custom_reward_function.path=FILE.py custom_reward_function.name=FN")
    judged: dict[str, list[list[Judgement]]] = {row.data_source: [] for row in rows}
    skipped = dict.fromkeys(judged, 0)
    for i, row in enumerate(rows):
        if not row.responses:
            skipped[row.data_source] += 1
            continue
        try:
            judgements = [reward.judge(row.data_source, response, row.ground_truth, row.extra_info)
                          for response in row.responses]
        except RewardError as e:
            raise EvalError(f"row {i}: {e}") from e
        judged.setdefault(row.data_source, []).append(judgements)
    return EvalReport(config.data_path, [
        summarize(source, source_rows, skipped[source], config.correct_threshold,
                  reward.extracts_answers())
        for source, source_rows in judged.items()])


def summarize(data_source: str, rows: list[list[Judgement]], skipped: int,
              correct_threshold: float, extracts_answers: bool) -> SourceReport:
    """One data source's metrics from its rows' judgements (each row: its n responses)."""
    if not rows:
        raise EvalError(f"no row of data_source {data_source!r} has responses "
                        f"({skipped} without: prompts rejected as too long?)")
    correct = [[j.score >= correct_threshold if j.correct is None else j.correct for j in row]
               for row in rows]
    fewest = min(len(row) for row in rows)
    pass_at = {k: mean([pass_at_k(len(row), sum(row), k) for row in correct])
               for k in pass_at_k_values(fewest)}
    majority = None
    if fewest > 1 and extracts_answers:
        votes = [majority_vote([j.answer for j in row]) for row in rows]
        majority = mean([0.0 if v is None else float(ok[v]) for v, ok in zip(votes, correct)])
    return SourceReport(data_source, len(rows), skipped, fewest, max(len(row) for row in rows),
                        mean([mean([j.score for j in row]) for row in rows]), pass_at, majority)


def write_json(report: EvalReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
