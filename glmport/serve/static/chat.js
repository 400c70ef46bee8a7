// The glmport chat page: talks to this server's OpenAI API only (no other origin, no external assets).
// The conversation lives in this page; every send posts it whole with "stream": true and shows the
// server-sent events as they arrive.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null };

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("glmport-api-key");
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

function setStatus(text) {
  $("status").textContent = text;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return body.error.message;
  } catch (ignored) { /* not JSON */ }
  return response.status + " " + response.statusText;
}

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (error) {
    setStatus("Cannot reach the server: " + error.message);
    return;
  }
  if (response.status === 401) {
    $("key-row").hidden = false;
    setStatus("This server needs an API key: " + await errorMessage(response));
    return;
  }
  if (!response.ok) {
    setStatus("Cannot list the models: " + await errorMessage(response));
    return;
  }
  const body = await response.json();
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren();
  for (const model of body.data) {
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = model.parent ? model.id + " (adapter on " + model.parent + ")" : model.id;
    select.append(option);
  }
  if (chosen && body.data.some((m) => m.id === chosen)) select.value = chosen;
  $("key-row").hidden = !sessionStorage.getItem("glmport-api-key");
  setStatus("Ready: " + body.data.length + " model(s).");
}

function addMessage(role, text) {
  const element = document.createElement("div");
  element.className = "message " + role;
  element.textContent = text;
  $("messages").append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

function showToolCalls(bubble, calls) {
  for (const call of calls) {
    const line = document.createElement("div");
    line.className = "tool";
    line.textContent = "tool call: " + call.function.name + " " + call.function.arguments;
    bubble.append(line);
  }
}

// Server-sent events: "data: {...}" lines separated by blank lines, ending with "data: [DONE]".
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data));
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  if (!$("model").value) {
    setStatus("No model to talk to yet.");
    return;
  }
  $("input").value = "";
  addMessage("user", text);
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const textNode = document.createTextNode("");
  bubble.append(textNode);
  state.controller = new AbortController();
  busy(true);
  setStatus("Generating...");
  let reply = "";
  let finish = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: state.controller.signal,
      body: JSON.stringify({
        model: $("model").value,
        messages,
        stream: true,
        max_tokens: Number($("max-tokens").value) || 256,
        temperature: Number($("temperature").value) || 0,
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        textNode.textContent = reply;
        bubble.scrollIntoView({ block: "end" });
      }
      if (choice.delta && choice.delta.tool_calls) showToolCalls(bubble, choice.delta.tool_calls);
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    state.history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    setStatus("Done (" + (finish || "stop") + ").");
  } catch (error) {
    if (error.name === "AbortError") {
      finish = "stopped";
      state.history.push({ role: "user", content: text }, { role: "assistant", content: reply });
      setStatus("Stopped.");
    } else {
      bubble.classList.add("error");
      textNode.textContent = (reply ? reply + "\n" : "") + "Error: " + error.message;
      setStatus("Error.");
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.finish = finish;
    bubble.dataset.done = "true";
    state.controller = null;
    busy(false);
  }
}

function reset() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  setStatus("Conversation reset.");
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("reset").addEventListener("click", reset);
  $("use-key").addEventListener("click", () => {
    sessionStorage.setItem("glmport-api-key", $("key").value.trim());
    $("key").value = "";
    loadModels();
  });
  loadModels();
});
