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

BF16_TIE = pytest.mark.xfail(
    strict=False,
    reason="fastgen's bf16 lm_head rounds logits to bf16: for the France prompt 'The' and 'L' tie "
           "at 25.375 and argmax takes 'L' (fp32 scores: 25.33 vs 25.24; HF bf16 gets 'The'). "
           "Needs float32 logits from the head (layers/embedding.py ParallelLMHead).")


@pytest.fixture(scope="module")
def model_dir():
    return default_model_dir()


@pytest.fixture(scope="module")
def llm_fp32(model_dir):
    return LLM(str(model_dir), dtype="float32", device="cpu")


def conversations() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in PROMPTS]


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=BF16_TIE)])
def test_greedy_chat_matches_transformers(model_dir, llm_fp32, dtype):
    llm = llm_fp32 if dtype == "float32" else LLM(str(model_dir), dtype=dtype, device="cpu")
    ours = llm.chat(conversations(), PARAMS)
    theirs = HFBackend(model_dir, dtype, "cpu").generate(PROMPTS, PARAMS, chat=True)
    assert ours[0].text == "The capital of France is Paris."
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
    assert [o.text for o in ours] == [o.text for o in theirs]


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
