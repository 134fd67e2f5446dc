"""RequestOutputKind on the tiny float32 Llama: the same seeded requests (n samples, logprobs,
prompt logprobs, stop strings, prompts fed in chunks) added CUMULATIVE, DELTA and FINAL_ONLY give
the same final results; FINAL_ONLY requests have one output, at the step that finishes them; DELTA
outputs hold exactly what CUMULATIVE ones add step by step, and add up (RequestOutput.add) to the
final output."""

import gc
from collections import defaultdict

import pytest

from fastgen import SamplingParams
from fastgen.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from tests.engine.test_continuous_batching import make_llm, prompts
from tests.engine.tiny_model import save_tiny_llama

KINDS = list(RequestOutputKind)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    # No prefix caching: each run is then scheduled step for step as the others.
    return make_llm(save_tiny_llama(tmp_path_factory.mktemp("tiny-kinds")),
                    max_num_batched_tokens=24, block_size=4, enable_prefix_caching=False)


def requests() -> list[tuple[list[int], SamplingParams]]:
    batch = prompts(5, seed=3)
    return [
        (batch[0], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)),
        (batch[1], SamplingParams(max_tokens=12, temperature=0.9, seed=5, n=3, logprobs=2,
                                  ignore_eos=True)),
        (batch[2], SamplingParams(max_tokens=14, temperature=1.0, seed=6, stop=["e", "a"],
                                  ignore_eos=True)),
        (batch[3], SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=1, logprobs=0,
                                  ignore_eos=True)),
        (batch[4], SamplingParams(max_tokens=0, prompt_logprobs=2)),  # scored only
    ]


def run(llm, kind: RequestOutputKind) -> dict[int, list[tuple[int, RequestOutput]]]:
    """Each request's outputs with the step they came from, by the request's index."""
    engine = llm.engine
    index = {engine.add_request(ids, params, output_kind=kind): i
             for i, (ids, params) in enumerate(requests())}
    outputs = defaultdict(list)
    step = 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            outputs[index[out.request_id]].append((step, out))
    assert not engine.has_unfinished() and engine.num_unfinished_requests == 0
    return outputs


@pytest.fixture(scope="module")
def runs(llm):
    return {kind: run(llm, kind) for kind in KINDS}


def whole(sample: CompletionOutput) -> tuple:
    """A sample's content, its delta left out."""
    return sample.index, sample.text, sample.token_ids, sample.finish_reason, sample.logprobs


def content(out: RequestOutput) -> tuple:
    return out.prompt_token_ids, out.prompt_logprobs, [whole(s) for s in out.outputs]


def test_the_requests_cover_the_cases(runs):
    final = {i: outs[-1][1] for i, outs in runs[RequestOutputKind.FINAL_ONLY].items()}
    assert len(final[1].outputs) == 3 and final[1].outputs[0].logprobs
    assert any(s.finish_reason.value == "stop" for s in final[2].outputs)  # a stop string
    assert final[3].prompt_logprobs is not None and final[4].token_ids == []


def test_final_only_outputs_come_once_when_finished(runs):
    cumulative, final = runs[RequestOutputKind.CUMULATIVE], runs[RequestOutputKind.FINAL_ONLY]
    assert sorted(final) == list(range(len(requests())))
    for i, outs in final.items():
        assert len(outs) == 1 and outs[0][1].finished
        assert outs[0][0] == cumulative[i][-1][0]  # the step that finished it
        assert content(outs[0][1]) == content(cumulative[i][-1][1])
        assert [s.delta for s in outs[0][1].outputs] == [s.text for s in outs[0][1].outputs]


def test_delta_outputs_hold_what_cumulative_ones_add(runs):
    cumulative, delta = runs[RequestOutputKind.CUMULATIVE], runs[RequestOutputKind.DELTA]
    for i, outs in cumulative.items():
        assert [step for step, _ in delta[i]] == [step for step, _ in outs]
        seen: dict[int, CompletionOutput] = {}
        for (_, cum), (_, new) in zip(outs, delta[i]):
            assert new.prompt_logprobs == cum.prompt_logprobs
            assert new.finished == cum.finished
            for c, d in zip(cum.outputs, new.outputs, strict=True):
                before = seen.get(c.index)
                sent = len(before.token_ids) if before else 0
                assert d.token_ids == c.token_ids[sent:]
                assert d.logprobs == (None if c.logprobs is None else c.logprobs[sent:])
                assert d.text == d.delta == c.delta
                assert d.finish_reason == c.finish_reason
                seen[c.index] = c
        total = RequestOutput.accumulate(delta[i][0][1])
        for _, new in delta[i][1:]:
            total.add(new)
        assert content(total) == content(outs[-1][1])


def test_accumulate_shares_no_list_with_the_first_output():
    first = RequestOutput(7, None, [1, 2], [CompletionOutput(0, "a", [3], None, [{3: -0.5}], "a")])
    total = RequestOutput.accumulate(first)
    total.add(RequestOutput(7, None, [1, 2], [CompletionOutput(0, "b", [4], None, [{4: -1.0}],
                                                                 "b")]))
    assert first.outputs[0].token_ids == [3] and first.outputs[0].logprobs == [{3: -0.5}]
    assert whole(total.outputs[0]) == (0, "ab", [3, 4], None, [{3: -0.5}, {4: -1.0}])


def test_streams_add_up_to_generate(llm):
    ids, params = requests()[1]
    expected = llm.generate([ids], params, use_tqdm=False)[0]
    outs = list(llm.engine.stream(ids, params, output_kind=RequestOutputKind.DELTA))
    total = RequestOutput.accumulate(outs[0])
    for out in outs[1:]:
        total.add(out)
    assert [whole(s) for s in total.outputs] == [whole(s) for s in expected.outputs]


def test_engine_start_freezes_what_loading_made(llm):
    assert gc.get_freeze_count() > 0
