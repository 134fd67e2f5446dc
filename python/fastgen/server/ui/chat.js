// fastgen's chat page: the conversation is kept here and sent whole to POST v1/chat/completions
// with stream: true; the answer's server-sent events are rendered as they arrive. Stop aborts the
// fetch, and the server, seeing its client leave, cancels the request and frees its KV blocks.
// Settings (system prompt, temperature, max tokens) live in localStorage; the API key, when the
// server wants one, in sessionStorage (this tab only). URLs are relative, so the page also works
// behind a proxy that serves fastgen under a path prefix.

import { render } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system-prompt", "temperature", "max-tokens"];
const FINISHED = {stop: "", length: "stopped at max tokens", stopped: "stopped",
                  tool_calls: "tool calls"};

const chat = {
  messages: [],       // {role, content, error?, finish?}: what was said, in order
  model: null,        // the served model's name, from v1/models
  maxModelLen: null,
  controller: null,   // the AbortController of the answer streaming in, if any
  apiKey: sessionStorage.getItem("fastgen.api-key") ?? "",
};
window.fastgenChat = chat;  // for a look from the console (and the browser test)

function headers() {
  const out = {"Content-Type": "application/json"};
  if (chat.apiKey) out.Authorization = `Bearer ${chat.apiKey}`;
  return out;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? body.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

function showModel(text, failed) {
  $("model").textContent = text;
  $("model").classList.toggle("error", failed);
}

/** Reads the served model from v1/models; asks for the API key when the server wants one. */
async function connect() {
  let response;
  try {
    response = await fetch("v1/models", {headers: headers()});
  } catch (error) {
    showModel(`cannot reach the server: ${error.message}`, true);
    setReady(false);
    return;
  }
  if (response.status === 401) {
    $("auth").hidden = false;
    $("auth-message").textContent = chat.apiKey ? "wrong API key" : "this server needs its API key";
    showModel("needs an API key", true);
    setReady(false);
    $("api-key").focus();
    return;
  }
  if (!response.ok) {
    showModel(await errorText(response), true);
    setReady(false);
    return;
  }
  const model = (await response.json()).data[0];
  chat.model = model.id;
  chat.maxModelLen = model.max_model_len;
  showModel(`${model.id} · context ${model.max_model_len} tokens`, false);
  $("max-tokens").max = model.max_model_len;
  $("auth").hidden = true;
  setReady(true);
}

function setReady(ready) {
  $("send").disabled = !ready || chat.controller !== null;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("send").disabled = busy || chat.model === null;
  document.body.dataset.state = busy ? "streaming" : "idle";
}

/** A message's view: .update(text) re-renders it, at most once per frame. */
function appendMessage(message) {
  const view = document.createElement("div");
  view.className = `message ${message.role}`;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role === "user" ? "You" : chat.model ?? "assistant";
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("div");
  meta.className = "meta";
  view.append(role, body, meta);
  const conversation = $("conversation");
  conversation.append(view);

  let pending = false;
  const draw = () => {
    pending = false;
    const atBottom = conversation.scrollHeight - conversation.scrollTop -
      conversation.clientHeight < 40;
    if (message.role === "assistant") body.replaceChildren(render(message.content));
    else body.textContent = message.content;
    if (atBottom) conversation.scrollTop = conversation.scrollHeight;
  };
  draw();
  return {
    element: view,
    update() {
      if (!pending) {
        pending = true;
        requestAnimationFrame(draw);
      }
    },
    finish(note, error) {
      draw();
      view.classList.remove("streaming");
      view.classList.toggle("error", Boolean(error));
      if (error) body.textContent = error;
      meta.textContent = note;
    },
  };
}

/** The data of each server-sent event in a response body, parsed, up to `data: [DONE]`. */
async function* events(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
        const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart()).join("\n");
        buffer = buffer.slice(end + 2);
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function request() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({role: "system", content: system});
  for (const message of chat.messages) {
    if (!message.error) messages.push({role: message.role, content: message.content});
  }
  const body = {model: chat.model, messages, stream: true, stream_options: {include_usage: true},
                temperature: Number($("temperature").value)};
  const maxTokens = Number($("max-tokens").value);
  if (Number.isInteger(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function send(text) {
  const question = {role: "user", content: text};
  chat.messages.push(question);
  appendMessage(question);
  const body = request();
  const answer = {role: "assistant", content: ""};
  chat.messages.push(answer);
  const view = appendMessage(answer);
  view.element.classList.add("streaming");

  const controller = new AbortController();
  chat.controller = controller;
  setBusy(true);
  const start = performance.now();
  let first = null;
  let usage = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of events(response.body)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices ?? []) {
        if (choice.delta?.content) {
          first ??= performance.now();
          answer.content += choice.delta.content;
          view.update();
        }
        if (choice.finish_reason) answer.finish = choice.finish_reason;
      }
    }
  } catch (error) {
    if (error.name === "AbortError") answer.finish = "stopped";
    else answer.error = question.error = error.message;  // a failed turn is not sent again
  } finally {
    chat.controller = null;
    setBusy(false);
  }
  const notes = [FINISHED[answer.finish] ?? answer.finish ?? ""];
  if (first !== null) {
    notes.push(`first token ${((first - start) / 1000).toFixed(2)} s`);
    const seconds = (performance.now() - first) / 1000;
    if (usage) {
      notes.push(`${usage.completion_tokens} tokens`);
      if (usage.completion_tokens > 1 && seconds > 0) {
        notes.push(`${((usage.completion_tokens - 1) / seconds).toFixed(1)} tokens/s`);
      }
    }
  }
  view.finish(notes.filter(Boolean).join(" · "), answer.error);
  $("prompt").focus();
}

function newChat() {
  chat.controller?.abort();
  chat.messages = [];
  $("conversation").replaceChildren();
  $("prompt").focus();
}

function setUp() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem(`fastgen.${id}`);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("input", () => localStorage.setItem(`fastgen.${id}`, $(id).value));
  }
  const showTemperature = () => { $("temperature-value").textContent = $("temperature").value; };
  $("temperature").addEventListener("input", showTemperature);
  showTemperature();

  $("settings-toggle").addEventListener("click", () => {
    const settings = $("settings");
    settings.hidden = !settings.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!settings.hidden));
  });
  $("new-chat").addEventListener("click", newChat);
  $("api-key-save").addEventListener("click", () => {
    chat.apiKey = $("api-key").value.trim();
    sessionStorage.setItem("fastgen.api-key", chat.apiKey);
    connect();
  });
  $("api-key").addEventListener("keydown", (event) => {
    if (event.key === "Enter") $("api-key-save").click();
  });

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || chat.controller !== null || chat.model === null) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => chat.controller?.abort());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") chat.controller?.abort();
  });
  setBusy(false);
  connect();
}

setUp();
