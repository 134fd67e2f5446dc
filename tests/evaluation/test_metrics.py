"""pass@k against enumerating every k-subset, majority vote's ties, the k reported."""

import itertools
import math

import pytest

from fastgen.evaluation.metrics import majority_vote, mean, pass_at_k, pass_at_k_values


def pass_at_k_by_subsets(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n responses (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_subsets(n, c, k), abs=1e-12)


def test_pass_at_k_special_cases():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 1, 10) == 1.0
    # large n: the binomials overflow a float, the product form does not
    n, c, k = 2000, 7, 500
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


@pytest.mark.parametrize("n, ks", [
    (1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 4]), (5, [1, 2, 4, 5]),
    (8, [1, 2, 4, 8]), (16, [1, 2, 4, 8, 16]), (20, [1, 2, 4, 8, 16, 20]),
])
def test_pass_at_k_values(n, ks):
    assert pass_at_k_values(n) == ks


@pytest.mark.parametrize("answers, winner", [
    (["3", "4", "4"], 1),
    (["3", "4", "4", "3"], 0),        # a tie: the answer seen first
    (["4", "3", "3", "4"], 0),
    ([None, None, "5"], 2),           # no answer, no vote
    ([None, "7", None, "8", "8"], 3),
    ([None, None], None),
    (["1"], 0),
])
def test_majority_vote(answers, winner):
    assert majority_vote(answers) == winner


def test_mean():
    assert mean([1.0, 0.0, 0.5]) == 0.5
    with pytest.raises(ValueError):
        mean([])
