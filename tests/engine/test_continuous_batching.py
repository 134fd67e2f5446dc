"""Continuous batching on the tiny float32 Llama, checked against transformers: chunked prefill
mixed with decoding gives the same greedy tokens as whole-prompt prefill, n samples share their
prompt's blocks, prompt logprobs equal log_softmax of HF's logits, max_tokens=0 only scores, and
aborting a request frees its blocks at once."""

import pytest
import torch

from fastgen import LLM, SamplingParams
from fastgen.outputs import FinishReason
from tests.engine.tiny_model import save_tiny_llama

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-cb"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


def make_llm(path, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", cpu_kv_cache_gib=0.01, **kwargs)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 60, (count,), generator=g).tolist()
    return [torch.randint(5, 300, (n,), generator=g).tolist() for n in lengths]


def test_chunked_prefill_mixed_with_decode_matches_whole_prompts(tiny):
    path = tiny[0]
    batch = prompts(6)
    whole = make_llm(path, max_num_batched_tokens=4096).generate(batch, GREEDY, use_tqdm=False)
    llm = make_llm(path, max_num_batched_tokens=7, block_size=4)  # chunks of up to 7 tokens
    scheduler = llm.engine.scheduler
    steps = []
    schedule = scheduler.schedule

    def recording_schedule():
        batch = schedule()
        if batch is not None:
            steps.append((batch.num_prefill_tokens, batch.num_decode_tokens))
        return batch

    scheduler.schedule = recording_schedule
    chunked = llm.generate(batch, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    assert llm.engine.stats.prefill_tokens == sum(map(len, batch))
    assert all(p + d <= 7 for p, d in steps)
    assert any(p > 0 and d > 0 for p, d in steps)  # prompt chunks rode with decode tokens


def test_requests_joining_a_running_batch_match_transformers(tiny):
    path, hf_model, _ = tiny
    llm = make_llm(path, max_num_batched_tokens=16)
    engine = llm.engine
    batch = prompts(4, seed=1)
    done: dict[int, list[int]] = {}
    ids = {}
    for i, prompt in enumerate(batch):  # a new request every few steps, while others decode
        ids[engine.add_request(prompt, GREEDY)] = i
        for _ in range(3):
            for out in engine.step():
                if out.finished:
                    done[ids[out.request_id]] = out.token_ids
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
    for i, prompt in enumerate(batch):
        x = torch.tensor([prompt])
        expected = hf_model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                     do_sample=False, max_new_tokens=10, min_new_tokens=10)
        assert done[i] == expected[0, len(prompt):].tolist()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_n_samples_share_the_prompt_blocks_and_differ(tiny):
    llm = make_llm(tiny[0], block_size=4)
    prompt = prompts(1, seed=2)[0] + list(range(10, 50))  # long enough for many full blocks
    params = SamplingParams(max_tokens=8, temperature=1.0, n=4, seed=3, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # independent draws
    stats = llm.engine.stats
    full = (len(prompt) - 1) // 4 * 4
    assert stats.prefix_cache_hit_tokens == 3 * full  # samples 1..3 fed only the last block
    again = llm.generate([prompt], params, use_tqdm=False)[0]  # seeded: sample i uses seed + i
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    one = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=4,
                                                ignore_eos=True), use_tqdm=False)[0]
    assert one.token_ids == out.outputs[1].token_ids  # sample 1 of seed 3 == seed 4


def test_prompt_logprobs_and_scoring_match_transformers(tiny):
    path, hf_model, _ = tiny
    llm = make_llm(path, max_num_batched_tokens=9)  # the prompt is scored across chunks
    prompt = prompts(1, seed=5)[0] + [7, 8, 9] * 8
    out = llm.generate([prompt, prompt], [SamplingParams(max_tokens=0, prompt_logprobs=2),
                                          SamplingParams(max_tokens=3, temperature=0,
                                                         prompt_logprobs=0)],
                       use_tqdm=False)
    with torch.no_grad():
        reference = hf_model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    for result, top in zip(out, (2, 0)):
        lp = result.prompt_logprobs
        assert len(lp) == len(prompt) and lp[0] is None
        for pos in range(1, len(prompt)):
            entry = lp[pos]
            assert entry[prompt[pos]] == pytest.approx(reference[pos - 1, prompt[pos]].item(),
                                                       abs=2e-4)
            best = reference[pos - 1].topk(top).indices.tolist()
            assert list(entry)[:top] == best and len(entry) <= top + 1
    assert out[0].token_ids == [] and out[0].finish_reason is FinishReason.LENGTH
    assert len(out[1].token_ids) == 3
    assert llm.engine.stats.prefix_cache_hit_tokens == 0  # scored prompts are never cached reads


def test_abort_frees_blocks_at_once(tiny):
    llm = make_llm(tiny[0])
    engine = llm.engine
    bm = engine.block_manager
    request_id = engine.add_request(prompts(1, seed=6)[0], SamplingParams(max_tokens=50, n=3))
    engine.step()
    engine.step()
    assert engine.num_running == 3 and bm.num_free_blocks < bm.num_blocks
    engine.abort_request(request_id)
    assert bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished()
    assert engine.num_unfinished_requests == 0
    assert engine.stats.requests_finished == {"abort": 1}
