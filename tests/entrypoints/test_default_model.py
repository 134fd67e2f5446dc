"""The real default model (SmolLM2-135M-Instruct, fetched once into $FASTGEN_CACHE by the
loader): fastgen's greedy chat answers equal Hugging Face transformers' in float32 and bfloat16,
and the model loaded from its .gguf file answers with the same tokens as its converted folder."""

import pytest

from fastgen import LLM, SamplingParams
from fastgen.entrypoints.hf_backend import HFBackend
from fastgen.loader.hub import SOURCE_GGUF, default_model_dir

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name the three primary colors.",
           "Write one sentence about the sea."]
PARAMS = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def model_dir():
    return default_model_dir()


@pytest.fixture(scope="module")
def llm_fp32(model_dir):
    return LLM(str(model_dir), dtype="float32", device="cpu")


def conversations() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in PROMPTS]


def test_greedy_chat_matches_transformers_float32(model_dir, llm_fp32):
    ours = llm_fp32.chat(conversations(), PARAMS)
    theirs = HFBackend(model_dir, "float32", "cpu").generate(PROMPTS, PARAMS, chat=True)
    assert ours[0].text == "The capital of France is Paris."
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
    assert [o.text for o in ours] == [o.text for o in theirs]


def test_greedy_chat_matches_transformers_bfloat16(model_dir):
    """Two bf16 implementations round differently, so over many tokens one may pick the other
    side of a near tie. Tokens must agree up to a first divergence, and there the float32 model's
    scores of the two choices must be closer than twice HF bf16's own logit error on that step
    (the flash-attention rule: bound by the reference's own low-precision error)."""
    import torch

    llm = LLM(str(model_dir), dtype="bfloat16", device="cpu")
    ours = llm.chat(conversations(), PARAMS)
    hf16 = HFBackend(model_dir, "bfloat16", "cpu")
    theirs = hf16.generate(PROMPTS, PARAMS, chat=True)
    assert ours[0].text == theirs[0].text == "The capital of France is Paris."
    hf32 = HFBackend(model_dir, "float32", "cpu", tokenizer=hf16.tokenizer).model
    for mine, ref in zip(ours, theirs):
        diverged = next((i for i, (a, b) in enumerate(zip(mine.token_ids, ref.token_ids))
                         if a != b), None)
        if diverged is None:
            assert mine.token_ids == ref.token_ids
            continue
        ids = torch.tensor([mine.prompt_token_ids + mine.token_ids[:diverged]])
        with torch.inference_mode():
            exact = hf32(ids).logits[0, -1].float()
            rounded = hf16.model(ids).logits[0, -1].float()
        gap = (exact[mine.token_ids[diverged]] - exact[ref.token_ids[diverged]]).abs()
        assert gap <= 2 * (rounded - exact).abs().max(), (diverged, gap)


def test_gguf_file_answers_like_its_converted_folder(model_dir, llm_fp32):
    # Prompts rendered once, with the folder's chat template, so only the weights can differ.
    tokenizer = llm_fp32.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(c, add_generation_prompt=True,
                                                              tokenize=False),
                                add_special_tokens=False) for c in conversations()]
    from_gguf = LLM(str(model_dir / SOURCE_GGUF), dtype="float32", device="cpu")
    params = SamplingParams(temperature=0, max_tokens=8)
    assert [o.token_ids for o in from_gguf.generate(prompts, params)] == \
        [o.token_ids for o in llm_fp32.generate(prompts, params)]
