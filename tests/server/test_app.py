"""The app's shared rules against a real server: health, models, errors in OpenAI's shape, the
API key, the body size limit."""

import httpx
import pytest

from tests.server.conftest import MODEL_NAME


def test_health_and_models(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]


def test_unknown_path_is_a_json_404(server):
    response = httpx.get(f"{server.url}/no/such/path")
    assert response.status_code == 404 and response.json()["error"]["code"] == 404


def test_a_wrong_method_is_a_405_with_its_allow_header(server):
    response = httpx.get(f"{server.url}/v1/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == 405


@pytest.fixture(scope="module")
def guarded(start_server):
    return start_server(api_key="s3cret", max_body_bytes=1000)


def test_api_key_is_required_everywhere_but_health(guarded):
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = httpx.get(f"{guarded.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "AuthenticationError"
    ok = httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_oversized_bodies_are_refused(guarded):
    response = httpx.post(f"{guarded.url}/v1/completions", content=b"x" * 5000,
                          headers={"Authorization": "Bearer s3cret",
                                   "Content-Type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_openapi_declares_every_routes_bodies_and_responses(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    components = schema["components"]["schemas"]
    paths = schema["paths"]
    bodies = {"/v1/completions": "CompletionRequest", "/v1/chat/completions":
              "ChatCompletionRequest", "/tokenize": "TokenizeRequest",
              "/detokenize": "DetokenizeRequest", "/completions": "MegatronCompletionRequest"}
    for path, model in bodies.items():
        ref = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}" and model in components
    put = paths["/api"]["put"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert {"prompts", "tokens_to_generate", "add_BOS"} <= set(
        components[put.rsplit("/", 1)[1]]["properties"])
    chat = components["ChatCompletionRequest"]["properties"]
    assert {"messages", "tools", "tool_choice", "response_format", "logit_bias"} <= set(chat)
    assert set(components["CompletionRequest"]["required"]) == {"prompt"}
    for path, methods in paths.items():
        for method, operation in methods.items():
            assert "200" in operation["responses"] and "400" in operation["responses"], path
    assert "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"][
        "content"]
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    error = paths["/tokenize"]["post"]["responses"]["400"]["content"]["application/json"]
    assert error["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
