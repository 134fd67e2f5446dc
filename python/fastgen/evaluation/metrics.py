"""Metrics over the n scored responses of one prompt: mean reward, unbiased pass@k, majority vote.

pass@k uses the estimator of Chen et al. 2021 (HumanEval) rather than "any of the first k is
right", so every one of the n samples counts and the estimate does not depend on their order."""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k responses drawn without replacement from n, of which c
    are correct, is correct: 1 - C(n-c, k) / C(n, k), computed as the product
    1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge) binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k must include a correct one
        return 1.0
    missed = 1.0
    for i in range(n - c + 1, n + 1):
        missed *= 1.0 - k / i
    return 1.0 - missed


def pass_at_k_values(n: int) -> list[int]:
    """The k to report for n samples: the powers of two below n, and n (n=5 -> [1, 2, 4, 5])."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """The index of the first response giving the most common answer; None when no response has
    one. Responses without an answer (None) do not vote; a tie goes to the answer seen first."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
            first.setdefault(answer, i)
    if not counts:
        return None
    # dicts keep insertion order, and max() keeps the first of equal counts: the first seen wins
    return first[max(counts, key=counts.__getitem__)]


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)
