"""The batched sampler: greedy rows are argmax, top-k / top-p never let an excluded token through,
draws follow the distribution, and a seeded request's tokens do not depend on its batch mates."""

import torch

from fastgen.config import SamplingParams
from fastgen.engine.sampler import Sampler, apply_top_k_top_p, argmax_rows

VOCAB = 1000


def random_logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(5)
    tokens = Sampler("cpu", seed=0)(logits, [SamplingParams(temperature=0)] * 5, [None] * 5)
    assert torch.equal(tokens, logits.argmax(-1))


def test_greedy_rows_stay_argmax_beside_sampled_rows():
    logits = random_logits(4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5)] * 2
    tokens = Sampler("cpu", seed=0)(logits, params, [None] * 4)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_top_k_and_top_p_never_sample_excluded_tokens():
    logits = random_logits(3, seed=1)
    sampler = Sampler("cpu", seed=0)
    params = [SamplingParams(temperature=2.0, top_k=5), SamplingParams(temperature=2.0, top_p=0.3),
              SamplingParams(temperature=2.0, top_k=50, top_p=0.5)]
    allowed_k = set(logits[0].topk(5).indices.tolist())
    probs = (logits[1] / 2.0).softmax(-1)
    order = probs.argsort(descending=True)
    keep = int((probs[order].cumsum(0) < 0.3).sum()) + 1  # smallest prefix with mass >= 0.3
    allowed_p = set(order[:keep].tolist())
    seen_k, seen_p = set(), set()
    for _ in range(300):
        tokens = sampler(logits, params, [None] * 3).tolist()
        seen_k.add(tokens[0])
        seen_p.add(tokens[1])
        assert tokens[2] in set(logits[2].topk(50).indices.tolist())
    assert seen_k <= allowed_k and len(seen_k) > 1
    assert seen_p <= allowed_p


def test_filter_keeps_exactly_k_and_the_nucleus():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 3.0, 0.0, -1.0]])
    out = apply_top_k_top_p(logits, [2, None], [None, 0.9])
    assert torch.isfinite(out[0]).sum() == 2  # ties do not widen top-k
    assert torch.isfinite(out[1]).tolist() == [True, True, False, False]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    sampler = Sampler("cpu", seed=0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sampler(logits, [SamplingParams()], [None])] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def draw(sampler: Sampler, logits: torch.Tensor, params, seeds, steps: int = 20) -> list[list[int]]:
    generators = [None if s is None else sampler.make_generator(s) for s in seeds]
    return [sampler(logits, params, generators).tolist() for _ in range(steps)]


def test_same_seed_same_tokens_regardless_of_batch_mates():
    logits = random_logits(4)
    params = [SamplingParams(temperature=1.0, seed=7)]
    alone = [row[0] for row in draw(Sampler("cpu", seed=1), logits[:1], params, [7])]
    batch_params = params + [SamplingParams(temperature=1.0),
                             SamplingParams(temperature=0.8, top_k=10, seed=3),
                             SamplingParams(temperature=0)]
    mixed = draw(Sampler("cpu", seed=2), logits, batch_params, [7, None, 3, None])
    assert [row[0] for row in mixed] == alone
    other_seed = [row[0] for row in draw(Sampler("cpu", seed=1), logits[:1], params, [8])]
    assert other_seed != alone


def test_unseeded_sampling_is_reproducible_from_the_engine_seed():
    logits = random_logits(3)
    params = [SamplingParams()] * 3
    assert draw(Sampler("cpu", seed=5), logits, params, [None] * 3) == \
        draw(Sampler("cpu", seed=5), logits, params, [None] * 3)


def test_top_k_draws_among_candidates_follow_the_filtered_distribution():
    # Every row has a top_k, so the sampler draws among topk candidates without sorting the
    # vocabulary; the frequencies must still be those of top-k then top-p, renormalised.
    logits = random_logits(1, seed=4)
    params = SamplingParams(temperature=1.3, top_k=6, top_p=0.8)
    expected = apply_top_k_top_p(logits / 1.3, [6], [0.8]).softmax(-1)[0]
    sampler = Sampler("cpu", seed=0)
    rows = 4000
    tokens = sampler(logits.expand(rows, -1), [params] * rows, [None] * rows)
    counts = torch.bincount(tokens, minlength=VOCAB).float() / rows
    assert set(tokens.tolist()) <= set(expected.nonzero()[:, 0].tolist())
    assert torch.allclose(counts, expected, atol=0.03)


def test_a_seeded_top_k_row_ignores_its_batch_mates_k():
    logits = random_logits(2, seed=5)
    params = [SamplingParams(temperature=1.0, top_k=5, seed=11)]
    alone = [row[0] for row in draw(Sampler("cpu", seed=1), logits[:1], params, [11])]
    mate = SamplingParams(temperature=1.0, top_k=200)  # widens the candidates to 200
    mixed = [row[0] for row in draw(Sampler("cpu", seed=2), logits, params + [mate], [11, None])]
    assert mixed == alone


def test_argmax_rows_is_argmax_with_ties_and_nans():
    x = torch.randn(5, 49152, generator=torch.Generator().manual_seed(0))
    x[1, [7, 30000, 100]] = 50.0  # ties: the first wins
    x[2, 9] = float("nan")
    x[3] = float("-inf")
    x[4, -1] = float("inf")
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert argmax_rows(x)[1] == 7
