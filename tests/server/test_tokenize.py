"""vLLM's /tokenize and /detokenize against a real server on the tiny model: a prompt, a chat
(the ids /v1/chat/completions would feed the model), token strings, the round trip, and bad
requests as 400s."""

import httpx
import pytest

from fastgen.tokenization import render_chat
from tests.server.conftest import MODEL_NAME


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_tokenize_a_prompt_and_back(server):
    text = "The capital of France is Paris. Café 日本語"
    out = post(server, "/tokenize", {"model": MODEL_NAME, "prompt": text,
                                     "return_token_strs": True}).json()
    ids = server.tokenizer.encode(text)
    assert out == {"count": len(ids), "max_model_len": 256, "tokens": ids,
                   "token_strs": server.tokenizer.convert_ids_to_tokens(ids)}
    assert post(server, "/detokenize", {"tokens": ids}).json() == {
        "prompt": server.tokenizer.decode(ids)}
    bare = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == server.tokenizer.encode(text, add_special_tokens=False)
    assert bare["token_strs"] is None


def test_tokenize_a_chat_gives_the_prompt_chat_completions_feeds(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = post(server, "/tokenize", {"messages": messages}).json()
    assert out["tokens"] == render_chat(server.tokenizer, messages)
    # The chat route counts the same prompt.
    chat = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == out["count"]
    opened = post(server, "/tokenize", {"messages": messages + [
        {"role": "assistant", "content": "Hel"}], "add_generation_prompt": False,
        "continue_final_message": True}).json()
    assert server.tokenizer.decode(opened["tokens"]).endswith("Hel")


@pytest.mark.parametrize("path, body, fragment", [
    ("/tokenize", {}, "either prompt or messages"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "either"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"messages": []}, "at least one message"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                   "continue_final_message": True}, "cannot both"),
    ("/tokenize", {"prompt": "a", "model": "other"}, "does not exist"),
    ("/detokenize", {"tokens": [1, 10_000_000]}, "outside the vocabulary"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {}, "tokens"),
])
def test_bad_requests_are_4xx(server, path, body, fragment):
    response = post(server, path, body)
    assert response.status_code in (400, 404), response.text
    assert fragment in response.json()["error"]["message"]
