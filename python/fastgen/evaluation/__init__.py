"""Scoring generated responses: rule and user rewards (rewards.py), pass@k and majority vote
(metrics.py), and the per-data-source report over a generated parquet file (eval.py), which
`fastgen-eval` prints.

    from fastgen.evaluation import EvalConfig, evaluate
    print(evaluate(EvalConfig("gsm8k_generated.parquet")).table())
"""

from fastgen.evaluation.eval import EvalConfig, EvalError, EvalReport, SourceReport, evaluate

__all__ = ["EvalConfig", "EvalError", "EvalReport", "SourceReport", "evaluate"]
