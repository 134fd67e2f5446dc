"""PUT /api, Megatron-LM's text generation API, against a real server on the tiny float32 Llama:
greedy generation and prompt scoring checked against Hugging Face transformers on the same
weights, Megatron's response shape, stop_on_eol, seeds, a client that disconnects, and every
validation rule answered as a JSON 400 by a server that keeps serving."""

import json
import socket
import time

import httpx
import pytest
import torch

from fastgen.ops.tolerances import assert_logits_close
from fastgen.server.megatron_api import MAX_PROMPTS, MegatronRequest

PROMPTS = ["The capital of France is", "Once upon a time", "Numbers: 0 1 2"]
TOKENS = 12


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def put(server, body: dict, **kwargs) -> httpx.Response:
    return httpx.put(f"{server.url}/api", json=body, timeout=kwargs.pop("timeout", 60), **kwargs)


def encode(server, prompt: str) -> list[int]:
    return server.tokenizer.encode(prompt, add_special_tokens=False)


@torch.inference_mode()
def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Prompt plus transformers' greedy continuation (stopping at the model's EOS)."""
    prompt = torch.tensor([ids])
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                          do_sample=False, max_new_tokens=max_new_tokens)[0].tolist()


@torch.inference_mode()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1: [len(ids) - 1]."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()  # [T - 1, V]
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_greedy_generation_matches_transformers(server, hf_model):
    """top_k=1 (Megatron's greedy) over several prompts at once: text, tokens, segments and
    logprobs as Megatron lays them out, each prompt's equal to transformers' greedy."""
    response = put(server, {"prompts": PROMPTS, "tokens_to_generate": TOKENS, "top_k": 1,
                            "temperature": 0.7, "logprobs": True})
    assert response.status_code == 200, response.text
    out = response.json()
    assert list(out) == ["text", "tokens", "logprobs", "segments"]
    tokenizer = server.tokenizer
    for i, prompt in enumerate(PROMPTS):
        expected = hf_greedy(hf_model, encode(server, prompt), TOKENS)
        generated = expected[len(encode(server, prompt)):]
        assert out["tokens"][i] == expected
        assert out["text"][i] == prompt + tokenizer.decode(generated, skip_special_tokens=True)
        assert out["segments"][i] == [tokenizer.decode([t]) for t in expected]
        assert len(out["logprobs"][i]) == len(expected) - 1
        assert_logits_close(torch.tensor(out["logprobs"][i]), hf_logprobs(hf_model, expected),
                            torch.float32)


def test_scoring_returns_the_prompts_logprobs(server, hf_model):
    """tokens_to_generate=0: nothing generated, every prompt token after the first scored; with
    add_BOS the BOS leads (and an empty prompt is just the BOS)."""
    bos = server.tokenizer.bos_token_id
    for add_bos in (False, True):
        prompts = PROMPTS + ([""] if add_bos else [])
        out = put(server, {"prompts": prompts, "tokens_to_generate": 0, "logprobs": True,
                           "add_BOS": add_bos}).json()
        assert out["text"] == prompts
        for prompt, tokens, logprobs in zip(prompts, out["tokens"], out["logprobs"]):
            assert tokens == [bos] * add_bos + encode(server, prompt)
            assert len(logprobs) == len(tokens) - 1
            if logprobs:
                assert_logits_close(torch.tensor(logprobs), hf_logprobs(hf_model, tokens),
                                    torch.float32)


def test_stop_on_eol_and_seeds(server):
    """Seeded sampling at a high temperature, the same prompt many times (prompt i is seeded
    random_seed + i): reproducible, different per prompt, and with stop_on_eol each generation
    ends at the token that brings the first newline, that token kept."""
    body = {"prompts": ["Once upon a time"] * 64, "tokens_to_generate": 48, "temperature": 50.0,
            "random_seed": 1234}
    free = put(server, body).json()
    assert list(free) == ["text", "tokens", "segments"]  # no logprobs unless asked
    assert put(server, body).json() == free
    assert len({tuple(t) for t in free["tokens"]}) > 1
    stopped = put(server, {**body, "stop_on_eol": True}).json()
    prompt_len = len(encode(server, "Once upon a time"))
    newlines = 0
    for tokens, segments, cut_tokens, cut_text in zip(free["tokens"], free["segments"],
                                                      stopped["tokens"], stopped["text"]):
        first = next((i for i in range(prompt_len, len(tokens)) if "\n" in segments[i]), None)
        if first is None:
            assert cut_tokens == tokens
        else:
            newlines += 1
            assert cut_tokens == tokens[:first + 1]
            assert cut_text.endswith(segments[first]) and "\n" in cut_text
    assert newlines > 0, "no sampled newline to stop at: pick another seed"


def test_client_disconnect_aborts_its_requests(server):
    """A client that hangs up once its prompts run: every one still running is aborted and
    its blocks freed, long before the generation would have ended."""
    engine = server.llm_engine
    aborted = engine.stats.requests_finished.get("abort", 0)
    decoded = engine.stats.decode_tokens
    body = json.dumps({"prompts": ["Once upon a time"] * MAX_PROMPTS,
                       "tokens_to_generate": 240, "random_seed": 7}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"PUT /api HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: engine.stats.decode_tokens > decoded)
    wait_for(lambda: not engine.has_unfinished())
    assert engine.stats.requests_finished.get("abort", 0) > aborted
    assert engine.kv_cache_usage == 0


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


BAD_BODIES = [
    ({}, "prompts argument required"),
    ({"prompts": ["a"], "max_len": 5}, "tokens_to_generate"),
    ({"prompts": ["a"], "sentences": ["a"]}, "replace it with prompts"),
    ({"prompts": "a"}, "list of strings"),
    ({"prompts": ["a", 1]}, "list of strings"),
    ({"prompts": []}, "empty"),
    ({"prompts": ["a"] * (MAX_PROMPTS + 1)}, f"at most {MAX_PROMPTS}"),
    ({"prompts": ["a"], "tokens_to_generate": -1}, "tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": 2.5}, "tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": True}, "tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": 10**6}, "context"),
    ({"prompts": ["a"], "logprobs": "yes"}, "logprobs must be a boolean"),
    ({"prompts": ["a"], "tokens_to_generate": 0}, "needs logprobs"),
    ({"prompts": ["a"], "temperature": 0}, "temperature"),
    ({"prompts": ["a"], "temperature": 100.5}, "temperature"),
    ({"prompts": ["a"], "temperature": "hot"}, "temperature"),
    ({"prompts": ["a"], "top_k": 1001}, "top_k"),
    ({"prompts": ["a"], "top_k": -1}, "top_k"),
    ({"prompts": ["a"], "top_k": 5, "top_p": 0.9}, "both top_k and top_p"),
    ({"prompts": ["a"], "top_p": 1.5}, "top_p"),
    ({"prompts": ["a"], "top_p_decay": 0.5}, "without top_p"),
    ({"prompts": ["a"], "top_p": 0.9, "top_p_decay": 2.0}, "top_p_decay"),
    ({"prompts": ["a"], "top_p_bound": 0.5}, "without top_p"),
    ({"prompts": ["a"], "top_p": 0.5, "top_p_bound": 0.9}, "top_p_bound"),
    ({"prompts": ["a"], "add_BOS": 1}, "add_BOS must be a boolean"),
    ({"prompts": ["a", ""]}, "add_BOS"),
    ({"prompts": ["a"], "stop_on_eol": "no"}, "stop_on_eol"),
    ({"prompts": ["a"], "stop_on_double_eol": None}, "stop_on_double_eol"),
    ({"prompts": ["a"], "prevent_newline_after_colon": 1}, "prevent_newline_after_colon"),
    ({"prompts": ["a"], "random_seed": -3}, "random_seed"),
    ({"prompts": ["a"], "random_seed": "42"}, "random_seed"),
    ({"prompts": ["a"], "no_log": 0}, "no_log"),
    ({"prompts": ["a"], "beam_width": 2}, "beam search"),
    ({"prompts": ["a"], "stop_token": -1}, "stop_token"),
    ({"prompts": ["a"], "stop_token": 2.0}, "stop_token"),
    ({"prompts": ["a"], "length_penalty": "long"}, "length_penalty"),
]


@pytest.mark.parametrize("body, fragment", BAD_BODIES, ids=lambda v: str(v)[:40])
def test_invalid_requests_are_json_400s(server, body, fragment):
    response = put(server, body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


def megatron_cli_answer(url: str, prompt: str, tokens: int) -> str:
    """What Megatron-LM's tools/text_generation_cli.py prints for one prompt: the text of a 200,
    else `Error <status>: <body["message"]>` (it reads the key unguarded)."""
    response = httpx.put(url, json={"prompts": [prompt], "tokens_to_generate": tokens},
                         headers={"Content-Type": "application/json; charset=UTF-8"},
                         timeout=60)
    if response.status_code != 200:
        return f"Error {response.status_code}: {response.json()['message']}"
    return response.json()["text"][0]


def test_megatron_cli_reads_the_message_of_errors(server):
    url = f"{server.url}/api"
    assert megatron_cli_answer(url, "Once upon a time", 4).startswith("Once upon a time")
    answer = megatron_cli_answer(url, "Once upon a time", -1)
    assert answer == "Error 400: tokens_to_generate must be an integer >= 0"
    body = put(server, {"prompts": ["a"], "top_k": -1}).json()
    assert body["message"] == body["error"]["message"]  # both shapes, one message
    # The app's own errors on the route carry it too (a wrong method, here).
    wrong = httpx.post(url, json={"prompts": ["a"]})
    assert wrong.status_code == 405 and wrong.json()["message"]
    assert wrong.headers["allow"] == "PUT"


def test_unpaired_surrogates_are_400s_naming_the_prompt(server):
    response = httpx.put(f"{server.url}/api", content=b'{"prompts": ["ok", "\\ud800abc"]}',
                         headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompts[1]" and "surrogate" in error["message"]


@pytest.mark.parametrize("content", [b"{", b"", b"\xff\xfe", b"[1, 2]", b'"prompts"',
                                     b'{"prompts": NaN}', b"[" * 100000])
def test_malformed_bodies_are_json_400s(server, content):
    response = httpx.put(f"{server.url}/api", content=content,
                         headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == 400


def test_server_keeps_serving_after_refusals(server):
    for body, _ in BAD_BODIES[:5]:
        assert put(server, body).status_code == 400
    response = put(server, {"prompts": ["a"], "tokens_to_generate": 2, "top_k": 1})
    assert response.status_code == 200 and len(response.json()["tokens"][0]) == 3


def test_sampling_params_follow_megatron():
    greedy = MegatronRequest.parse({"prompts": ["a", "b"], "top_k": 1, "temperature": 3.0,
                                    "random_seed": 10, "stop_token": 7,
                                    "stop_on_eol": True, "stop_on_double_eol": True})
    first, second = greedy.sampling_params(0), greedy.sampling_params(1)
    assert first.greedy and first.top_k is None and first.top_p is None
    assert (first.seed, second.seed) == (10, 11)
    assert first.stop == ["\n\n"] and first.stop_token_ids == [7]  # double eol wins
    assert first.logprobs is None and first.prompt_logprobs is None
    nucleus = MegatronRequest.parse({"prompts": ["a"], "top_p": 0.9, "top_p_decay": 0.5,
                                     "top_p_bound": 0.2, "logprobs": True, "stop_on_eol": True})
    params = nucleus.sampling_params(0)
    assert (params.temperature, params.top_k, params.top_p, params.seed) == (1.0, None, 0.9, None)
    assert params.stop == ["\n"] and params.max_tokens == 64
    assert (params.logprobs, params.prompt_logprobs) == (0, 0)


# Megatron's POST /completions.

def post_completions(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/completions", json=body, timeout=60)


def test_completions_greedy_matches_put_api(server):
    """temperature 0 is greedy; one choice per prompt, in Megatron's shape, equal to PUT /api's
    greedy tokens (which are checked against transformers above)."""
    out = post_completions(server, {"prompt": PROMPTS[:2], "max_tokens": TOKENS,
                                    "temperature": 0})
    assert out.status_code == 200, out.text
    choices = out.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and list(out.json()) == ["choices"]
    reference = put(server, {"prompts": PROMPTS[:2], "tokens_to_generate": TOKENS,
                             "top_k": 1, "stop_on_double_eol": True}).json()
    for choice, prompt, text, tokens in zip(choices, PROMPTS, reference["text"],
                                            reference["tokens"]):
        assert choice["text"] == text[len(prompt):]
        logprobs = choice["logprobs"]
        assert set(logprobs) == {"token_logprobs", "tokens", "text_offset", "top_logprobs"}
        generated = tokens[len(encode(server, prompt)):]
        assert logprobs["tokens"] == server.tokenizer.batch_decode([[t] for t in generated])
        assert len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) == len(generated)
        assert logprobs["text_offset"][0] == 0 and logprobs["top_logprobs"] is None
        assert all(v <= 0 for v in logprobs["token_logprobs"])


def test_completions_echo_scores_the_prompt(server, hf_model):
    prompt = PROMPTS[0]
    out = post_completions(server, {"prompt": prompt, "max_tokens": 0, "echo": True,
                                    "logprobs": 2}).json()["choices"][0]
    assert out["text"] == prompt
    ids = encode(server, prompt)
    logprobs = out["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert_logits_close(torch.tensor(logprobs["token_logprobs"][1:]), hf_logprobs(hf_model, ids),
                        torch.float32)
    assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"][1:])
    assert len(logprobs["tokens"]) == len(ids)


def test_completions_cut_the_text_at_stop_strings(server):
    whole = post_completions(server, {"prompt": "Numbers: 0 1 2", "max_tokens": 10,
                                      "temperature": 0}).json()["choices"][0]["text"]
    cut_at = whole[len(whole) // 2:][:2] or whole[-1:]
    cut = post_completions(server, {"prompt": "Numbers: 0 1 2", "max_tokens": 10,
                                    "temperature": 0, "stop": cut_at}).json()["choices"][0]
    assert cut["text"] == whole[:whole.find(cut_at)]
    assert "".join(cut["logprobs"]["tokens"]).startswith(cut["text"])


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "a"}, "max_tokens is required"),
    ({"prompt": "a", "max_tokens": 4, "n": 2}, "n > 1 not supported"),
    ({"prompt": "a", "max_tokens": 4, "best_of": 3}, "best_of > 1 not supported"),
    ({"prompt": "a", "max_tokens": 0}, "echo=False not supported"),
    ({"prompt": "a", "max_tokens": 0, "echo": True, "logprobs": 11}, "logprobs > 10"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": 5, "max_tokens": 1}, "prompt must be"),
    ({"prompt": [1, 10**7], "max_tokens": 1}, "outside the vocabulary"),
    ({"prompt": "a", "max_tokens": 10**6}, "context"),
    ({"prompt": "a", "max_tokens": 1, "stop": [""]}, "stop"),
])
def test_completions_refusals_are_400s_with_megatrons_message(server, body, fragment):
    response = post_completions(server, body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["message"] == response.json()["error"]["message"]


# top_p_decay / top_p_bound and prevent_newline_after_colon, applied.

def test_top_p_decay_shrinks_top_p_token_by_token(server, tiny_model_path):
    """top_p 0.99 decaying by 0.001 a token: from the second token on the nucleus is one token,
    so the rest of the answer is the greedy continuation of the first (and without the decay it
    is not)."""
    from fastgen import SamplingParams
    from tests.engine.test_continuous_batching import make_llm

    prompt = PROMPTS[1]
    ids = encode(server, prompt)
    body = {"prompts": [prompt], "tokens_to_generate": 8, "top_p": 0.99, "random_seed": 3}
    decayed = put(server, {**body, "top_p_decay": 0.001, "top_p_bound": 1e-9}).json()
    generated = decayed["tokens"][0][len(ids):]
    offline = make_llm(tiny_model_path)
    [greedy] = offline.generate([ids + generated[:1]], SamplingParams(
        max_tokens=7, temperature=0, ignore_eos=True), use_tqdm=False)
    assert greedy.outputs[0].token_ids[:len(generated) - 1] == generated[1:]
    fixed = put(server, body).json()["tokens"][0][len(ids):]
    assert fixed[:1] == generated[:1] and fixed != generated  # same seed, no decay: it wanders


def test_sampling_params_carry_megatrons_decay_and_colon_rule():
    req = MegatronRequest.parse({"prompts": ["a"], "top_p": 0.8, "top_p_decay": 0.5,
                                 "top_p_bound": 0.3, "prevent_newline_after_colon": True})
    params = req.sampling_params(0)
    assert params.prevent_newline_after_colon
    assert [params.top_p_at(k) for k in range(3)] == [0.8, 0.4, 0.3]
