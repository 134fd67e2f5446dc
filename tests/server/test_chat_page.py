"""The chat page at /: its files as the server sends them, and the page itself driven in a real
headless browser (Chromium through playwright): a prompt typed and its answer streamed in (the
same text the API gives), markdown rendered into safe DOM, a long answer stopped (its request
cancelled and its KV blocks freed), the API key asked for when the server wants one.

The browser tests skip where playwright or a Chromium is missing (`.ci/run` installs both: the
Debian package `chromium`, or set FASTGEN_CHROMIUM to a Chrome or Chromium binary). Screenshots
go to $FASTGEN_TEST_ARTIFACTS (default: test-artifacts/ at the repository's root).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from fastgen.server import chat_page
from tests.server.conftest import MODEL_NAME

ARTIFACTS = Path(os.environ.get("FASTGEN_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "test-artifacts"))
UI = Path(chat_page.__file__).parent / "ui"


# --- the files, over plain HTTP ---------------------------------------------------------------

def test_the_page_and_its_files_are_served_with_a_strict_policy(server):
    kinds = {"/": "text/html", "/ui/chat.js": "text/javascript",
             "/ui/markdown.js": "text/javascript", "/ui/chat.css": "text/css"}
    for path, kind in kinds.items():
        response = httpx.get(server.url + path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == f"{kind}; charset=utf-8"
        assert response.headers["x-content-type-options"] == "nosniff"
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        again = httpx.get(server.url + path, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    assert httpx.head(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/ui/nothing.js").status_code == 404
    assert "/" not in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_the_page_loads_nothing_from_elsewhere():
    html = (UI / "index.html").read_text()
    for url in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert url.startswith(("ui/", "data:")), url
    for script in ("chat.js", "markdown.js"):
        for module in re.findall(r'^import .* from "([^"]+)";', (UI / script).read_text(), re.M):
            assert module.startswith("./"), module
        assert "fetch(\"http" not in (UI / script).read_text()
    css = (UI / "chat.css").read_text()
    assert "url(" not in css and "@import" not in css


@pytest.fixture(scope="module")
def guarded(start_server):
    return start_server(api_key="s3cret")


def test_the_page_needs_no_key_but_the_api_still_does(guarded):
    assert httpx.get(guarded.url + "/").status_code == 200
    assert httpx.get(guarded.url + "/ui/chat.js").status_code == 200
    assert httpx.get(f"{guarded.url}/v1/models").status_code == 401


def test_no_ui_turns_the_page_off(start_server):
    server = start_server(ui=False)
    for path in ("/", "/ui/chat.js"):
        response = httpx.get(server.url + path)
        assert response.status_code == 404 and response.json()["error"]["code"] == 404
    assert httpx.get(f"{server.url}/v1/models").status_code == 200


# --- the page in a browser --------------------------------------------------------------------

def _chromium() -> str | None:
    for candidate in (os.environ.get("FASTGEN_CHROMIUM"), "chromium", "chromium-browser",
                      "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium here (apt-get install chromium, or set FASTGEN_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh tab (its own storage) that fails the test on any script error or dialog."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else 0)
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    page.errors = errors
    yield page
    context.close()
    # A 401 the page expects (it asks for the key then) is logged by Chromium as a console error.
    unexpected = [e for e in errors if "401 (Unauthorized)" not in e]
    assert not unexpected, unexpected


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _set(page, selector: str, value: str) -> None:
    """Sets an input the way a user's edit does (a range input cannot be typed into)."""
    page.locator(selector).evaluate(
        "(input, value) => { input.value = value; "
        "input.dispatchEvent(new Event('input', {bubbles: true})); }", value)


def _ask(page, prompt: str) -> None:
    turns = page.evaluate("window.fastgenChat.messages.length")
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    page.wait_for_function(f"() => window.fastgenChat.messages.length === {turns + 2}")


def _wait_idle(page, timeout_ms: int = 30_000) -> None:
    page.wait_for_function("() => document.body.dataset.state === 'idle'", timeout=timeout_ms)


@pytest.fixture(scope="module")
def slow(start_server):
    """50 ms per engine step: an answer streams over seconds, as from a big model."""
    return start_server(step_delay=0.05)


def test_a_typed_prompt_streams_in_the_answer_the_api_gives(slow, page):
    page.goto(slow.url + "/")
    page.wait_for_function(
        f"() => document.querySelector('#model').textContent.startsWith({MODEL_NAME!r})")
    assert "context 256 tokens" in page.inner_text("#model")
    assert page.is_hidden("#auth")
    page.click("#settings-toggle")
    page.fill("#system-prompt", "You are a terse assistant.")
    _set(page, "#temperature", "0")
    page.fill("#max-tokens", "20")
    # Every change of the answer's text, as the browser renders it.
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const body = document.querySelector('.message.assistant:last-child .body');
            if (body) window.seen.push(body.textContent.length);
        }).observe(document.querySelector('#conversation'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    _ask(page, "Tell me about the sky.")
    page.wait_for_function("() => document.body.dataset.state === 'streaming'")
    assert page.is_visible("#stop") and page.is_hidden("#send")
    _wait_idle(page)
    lengths = page.evaluate("window.seen")
    assert len(set(lengths)) >= 4, f"the answer did not stream in: {lengths}"

    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Tell me about the sky."}]
    for turn in range(2):
        shown = page.evaluate("window.fastgenChat.messages")
        assert [m["role"] for m in shown] == ["user", "assistant"] * (turn + 1)
        answer = httpx.post(f"{slow.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL_NAME, "messages": messages, "temperature": 0, "max_tokens": 20,
        }).json()["choices"][0]
        assert shown[-1]["content"] == answer["message"]["content"]
        assert shown[-1]["finish"] == answer["finish_reason"]
        meta = page.locator(".message.assistant .meta").nth(turn).inner_text()
        assert "tokens/s" in meta and "first token" in meta, meta
        if turn == 0:  # a second turn sends the whole conversation
            messages += [{"role": "assistant", "content": answer["message"]["content"]},
                         {"role": "user", "content": "And the sea?"}]
            _ask(page, "And the sea?")
            _wait_idle(page)
    assert page.locator(".message.user .body").nth(1).inner_text() == "And the sea?"
    _screenshot(page, "chat-page")

    page.click("#new-chat")
    assert page.evaluate("window.fastgenChat.messages.length") == 0
    assert page.locator(".message").count() == 0
    page.reload()  # the settings are kept
    page.wait_for_function("() => window.fastgenChat.model !== null")
    assert page.input_value("#max-tokens") == "20"
    assert page.input_value("#system-prompt") == "You are a terse assistant."


MARKDOWN = """# Title
Some **bold**, *italic*, ~~gone~~ and `code` with snake_case_name.
A second line.

```python
def f(x):
    return x < 1 and "<b>"
```

- one
- two
  - nested
3. three

| a | b |
|---|--:|
| 1 | 2 |

> quoted

[safe](https://example.com/x) [evil](javascript:alert(1)) ![pic](https://example.com/p.png)
<script>alert(1)</script> <img src=x onerror=alert(1)>

```js
let streaming = "unclosed"""


def test_markdown_is_rendered_into_safe_dom(server, page):
    page.goto(server.url + "/")
    found = page.evaluate("""async (text) => {
        const {render} = await import('./ui/markdown.js');
        const box = document.createElement('div');
        box.append(render(text));
        const all = (s) => [...box.querySelectorAll(s)];
        return {
            h1: all('h1').map(e => e.textContent),
            strong: all('p strong').map(e => e.textContent),
            em: all('p em').map(e => e.textContent),
            del: all('del').map(e => e.textContent),
            inline: all('p code').map(e => e.textContent),
            breaks: all('p:first-of-type br').length,
            code: all('pre code').map(e => [e.className, e.textContent]),
            items: all(':scope > ul > li').map(e => e.firstChild.textContent),
            nested: all('ul ul > li').map(e => e.textContent),
            ordered: all('ol').map(e => [e.start, e.textContent]),
            cells: all('td').map(e => [e.textContent, e.style.textAlign]),
            quote: all('blockquote').map(e => e.textContent),
            links: all('a').map(e => [e.textContent, e.getAttribute('href'), e.rel]),
            dangerous: all('script, img, iframe, [onerror]').length,
            text: box.textContent,
        };
    }""", MARKDOWN)
    assert found["h1"] == ["Title"]
    assert found["strong"] == ["bold"] and found["em"] == ["italic"] and found["del"] == ["gone"]
    assert found["inline"] == ["code"] and "snake_case_name" in found["text"]
    assert found["breaks"] == 1
    assert found["code"] == [["language-python", 'def f(x):\n    return x < 1 and "<b>"'],
                             ["language-js", 'let streaming = "unclosed']]
    assert found["items"] == ["one", "two"] and found["nested"] == ["nested"]
    assert found["ordered"] == [[3, "three"]]
    assert found["cells"] == [["1", ""], ["2", "right"]]
    assert found["quote"] == ["quoted"]
    assert found["links"] == [["safe", "https://example.com/x", "noopener noreferrer"],
                              ["[image: pic]", "https://example.com/p.png",
                               "noopener noreferrer"]]
    assert found["dangerous"] == 0
    assert "<script>alert(1)</script>" in found["text"] and "evil" in found["text"]


def test_stop_ends_a_long_answer_and_frees_its_kv_blocks(slow, page):
    engine = slow.llm_engine
    generated = engine.stats.generation_tokens
    page.goto(slow.url + "/")
    page.wait_for_function("() => window.fastgenChat.model !== null")
    page.click("#settings-toggle")
    page.fill("#max-tokens", "200")  # 10 s at 50 ms a token
    _ask(page, "Write a long story.")
    page.wait_for_function("() => window.fastgenChat.messages[1].content.length > 8")
    assert engine.num_running == 1 and engine.kv_cache_usage > 0
    _screenshot(page, "chat-page-streaming")
    page.click("#stop")
    _wait_idle(page)
    answer = page.evaluate("window.fastgenChat.messages[1]")
    assert answer["finish"] == "stopped" and answer["content"]
    assert "stopped" in page.locator(".message.assistant .meta").inner_text()
    deadline = time.monotonic() + 10
    while engine.num_running or engine.kv_cache_usage or slow.engine.num_waiting:
        assert time.monotonic() < deadline, "the stopped request kept running"
        time.sleep(0.05)
    assert engine.stats.generation_tokens - generated < 100
    metrics = httpx.get(f"{slow.url}/metrics").text
    assert re.search(r'fastgen:requests_total\{endpoint="chat_completions",finished_reason="abort"\} 1',
                     metrics), metrics
    # The page is ready for the next prompt, whose answer still comes.
    page.fill("#max-tokens", "4")
    _ask(page, "Short one.")
    _wait_idle(page)
    assert page.evaluate("window.fastgenChat.messages[3].finish") in ("length", "stop")


def test_the_page_asks_for_the_api_key_when_the_server_wants_one(guarded, page):
    page.goto(guarded.url + "/")
    page.wait_for_selector("#auth", state="visible")
    assert "needs an API key" in page.inner_text("#model")
    assert page.is_disabled("#send")
    page.fill("#api-key", "wrong")
    page.click("#api-key-save")
    page.wait_for_function("() => document.querySelector('#auth-message').textContent === "
                           "'wrong API key'")
    page.fill("#api-key", "s3cret")
    page.press("#api-key", "Enter")
    page.wait_for_selector("#auth", state="hidden")
    assert page.inner_text("#model").startswith(MODEL_NAME)
    page.click("#settings-toggle")
    page.fill("#max-tokens", "6")
    _ask(page, "Hello")
    _wait_idle(page)
    answer = page.evaluate("window.fastgenChat.messages[1]")
    assert "error" not in answer and answer["finish"] in ("length", "stop")


def test_an_error_from_the_server_is_shown_not_swallowed(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("() => window.fastgenChat.model !== null")
    page.click("#settings-toggle")
    page.fill("#max-tokens", "100000")  # more than the context: a 400 with a message
    _ask(page, "Hello")
    _wait_idle(page)
    error = page.locator(".message.assistant.error .body").inner_text()
    assert "max_tokens" in error or "context" in error, error
    page.errors[:] = [e for e in page.errors if "400 (Bad Request)" not in e]


@pytest.mark.slow
def test_the_default_model_answers_in_the_page_as_through_the_api(start_server, page):
    """The real model and tokenizer: the streamed pieces (multi-byte characters, merged BPE
    tokens, markdown) add up to the API's greedy answer, rendered."""
    from fastgen.loader.hub import default_model_dir

    server = start_server(model_path=default_model_dir())
    question = "Write a Python function that adds two numbers, in a code block."
    page.goto(server.url + "/")
    page.wait_for_function("() => window.fastgenChat.model !== null")
    page.click("#settings-toggle")
    _set(page, "#temperature", "0")
    page.fill("#max-tokens", "96")
    page.click("#settings-toggle")
    _ask(page, question)
    _wait_idle(page, timeout_ms=120_000)
    shown = page.evaluate("window.fastgenChat.messages[1]")
    answer = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": question}],
        "temperature": 0, "max_tokens": 96}).json()["choices"][0]
    assert shown["content"] == answer["message"]["content"] and shown["content"].strip()
    assert shown["finish"] == answer["finish_reason"]
    if "```" in shown["content"]:  # what the model wrote as code is shown as code
        assert page.locator(".message.assistant pre code").count() >= 1
    _screenshot(page, "chat-page-default-model")
