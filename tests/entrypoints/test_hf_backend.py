"""The Hugging Face baseline answers the same requests as fastgen: identical greedy tokens on the
tiny model, stop strings applied afterwards."""

import pytest

from fastgen import LLM, SamplingParams
from fastgen.engine.sequence import FinishReason
from fastgen.entrypoints.hf_backend import HFBackend
from tests.engine.tiny_model import save_tiny_llama

PROMPTS = ["The capital of France is", "Once upon a time"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return (LLM(str(path), dtype="float32", device="cpu", cpu_kv_cache_gib=0.01),
            HFBackend(path, "float32", "cpu"))


def test_greedy_tokens_and_text_match_fastgen(engines):
    llm, hf = engines
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ours = llm.generate(PROMPTS, params)
    theirs = hf.generate(PROMPTS, params)
    assert [o.token_ids for o in theirs] == [o.token_ids for o in ours]
    assert all(o.finish_reason is FinishReason.LENGTH for o in theirs)
    chat_ours = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    chat_theirs = hf.generate(PROMPTS, params, chat=True)
    assert [o.token_ids for o in chat_theirs] == [o.token_ids for o in chat_ours]


def test_stop_strings_cut_the_text(engines):
    llm, hf = engines
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = hf.generate(PROMPTS[:1], params)[0]
    clean = [i for i in range(2, len(full.text) - 2) if "\ufffd" not in full.text[i:i + 2]]
    params.stop = [full.text[clean[0]:clean[0] + 2]]
    out = hf.generate(PROMPTS[:1], params)[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == full.text[: full.text.find(params.stop[0])]
    assert out.token_ids == llm.generate(PROMPTS[:1], params)[0].token_ids
