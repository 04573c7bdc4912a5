// lmforge playground: streams /v1/completions (or /v1/chat/completions) with log-probs and
// shows each generated token coloured by its probability; clicking a token shows the
// model's top alternatives at that step. Plain JS, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { controller: null, tokens: [], selected: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function intOr(id, fallback) {
  const v = parseInt($(id).value, 10);
  return Number.isFinite(v) ? v : fallback;
}

function requestBody() {
  const k = Math.min(20, Math.max(1, intOr("alternatives", 5)));
  const body = {
    model: $("model-select").value || undefined,
    max_tokens: Math.max(1, intOr("max-tokens", 64)),
    temperature: parseFloat($("temperature").value),
    top_k: Math.max(0, intOr("top-k", 0)),
    top_p: parseFloat($("top-p").value),
    stream: true,
  };
  const seed = parseInt($("seed").value, 10);
  if (Number.isFinite(seed)) body.seed = seed;
  if ($("stop").value) body.stop = [$("stop").value];
  if (mode() === "chat") {
    body.messages = [{ role: "user", content: $("prompt").value }];
    body.logprobs = true;
    body.top_logprobs = k;
  } else {
    body.prompt = $("prompt").value;
    body.logprobs = k;
  }
  return body;
}

// ---- output ------------------------------------------------------------------------------

function probColour(p) {
  // red (p <= 0.001) -> green (p = 1) on a log scale, light enough to read text on
  const x = Math.min(1, Math.max(0, 1 + Math.log10(Math.max(p, 1e-6)) / 3));
  return `hsl(${Math.round(120 * x)}, 70%, 85%)`;
}

function addToken(tok) {
  const i = state.tokens.length;
  state.tokens.push(tok);
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = tok.text;
  span.dataset.index = String(i);
  span.tabIndex = 0;
  span.setAttribute("role", "button");
  if (!tok.text) span.title = "part of a character (its bytes complete in a later token)";
  if (tok.logprob !== null && tok.logprob !== undefined) {
    span.style.background = probColour(Math.exp(tok.logprob));
    span.title = (span.title ? span.title + "; " : "") + `p = ${(100 * Math.exp(tok.logprob)).toFixed(2)}%`;
  }
  $("output").appendChild(span);
}

// A token as a quoted string (so spaces and newlines show); "bytes:\xe2" tokens (part of a
// character) as they are.
function showToken(token) {
  return token.startsWith("bytes:") ? token : JSON.stringify(token);
}

function showDetail(index) {
  const tok = state.tokens[index];
  if (!tok) return;
  if (state.selected) state.selected.classList.remove("selected");
  state.selected = $("output").querySelector(`.tok[data-index="${index}"]`);
  if (state.selected) state.selected.classList.add("selected");
  $("token-detail").hidden = false;
  const p = tok.logprob === null ? null : Math.exp(tok.logprob);
  $("detail-summary").textContent =
    `Step ${index + 1}: chose ${tok.text ? JSON.stringify(tok.text) : "part of a character"}` + (p === null ? "" : ` with p = ${(100 * p).toFixed(2)}%`);
  const rows = $("detail-rows");
  rows.replaceChildren();
  const pMax = Math.max(...tok.top.map((a) => Math.exp(a.logprob)), 1e-12);
  for (const alt of tok.top) {
    const tr = document.createElement("tr");
    tr.className = "alt" + (alt.token === tok.text ? " chosen" : "");
    const prob = Math.exp(alt.logprob);
    const cells = [showToken(alt.token), `${(100 * prob).toFixed(2)}%`];
    for (const [j, text] of cells.entries()) {
      const td = document.createElement("td");
      td.textContent = text;
      if (j === 0) td.className = "token";
      tr.appendChild(td);
    }
    const barCell = document.createElement("td");
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, Math.round(160 * prob / pMax))}px`;  // relative to the most likely
    barCell.appendChild(bar);
    tr.appendChild(barCell);
    rows.appendChild(tr);
  }
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(message) {
  const div = document.createElement("div");
  div.className = "error";
  div.textContent = "Error: " + message;
  $("output").appendChild(div);
}

// ---- streaming ---------------------------------------------------------------------------

// Tokens of one stream chunk, in a common shape: {text, logprob, top: [{token, logprob}]}.
function chunkTokens(choice) {
  const lp = choice.logprobs;
  if (!lp) {
    const text = choice.text ?? choice.delta?.content ?? "";
    return text ? [{ text, logprob: null, top: [] }] : [];
  }
  if (lp.content) { // chat
    return lp.content.map((t) => ({ text: t.token, logprob: t.logprob,
      top: t.top_logprobs.map((a) => ({ token: a.token, logprob: a.logprob })) }));
  }
  return lp.tokens.map((text, i) => ({ text, logprob: lp.token_logprobs[i],
    top: Object.entries(lp.top_logprobs[i] || {}).map(([token, logprob]) => ({ token, logprob }))
      .sort((a, b) => b.logprob - a.logprob) }));
}

async function generate() {
  const body = requestBody();
  const url = mode() === "chat" ? "/v1/chat/completions" : "/v1/completions";
  state.tokens = [];
  state.selected = null;
  $("token-detail").hidden = true;
  const out = $("output");
  out.replaceChildren();
  if (mode() === "completion") {
    const p = document.createElement("span");
    p.className = "prompt-text";
    p.textContent = body.prompt;
    out.appendChild(p);
  }
  state.controller = new AbortController();
  $("generate").disabled = true;
  $("stop-btn").disabled = false;
  setStatus("generating…");
  const started = performance.now();
  let finish = null;
  try {
    const res = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal });
    if (!res.ok) {
      let message = `HTTP ${res.status}`;
      try { message = (await res.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    await readEvents(res, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        for (const tok of chunkTokens(choice)) addToken(tok);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      const secs = (performance.now() - started) / 1000;
      setStatus(`${state.tokens.length} tokens, ${(state.tokens.length / secs).toFixed(1)} tokens/s`);
    });
    const secs = (performance.now() - started) / 1000;
    setStatus(`${state.tokens.length} tokens in ${secs.toFixed(2)} s` + (finish ? ` — finished: ${finish}` : ""));
  } catch (err) {
    if (err.name === "AbortError") setStatus(`stopped after ${state.tokens.length} tokens`);
    else { showError(err.message); setStatus("failed"); }
  } finally {
    state.controller = null;
    $("generate").disabled = false;
    $("stop-btn").disabled = true;
  }
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.status === 401) { $("model-name").textContent = "API key required"; return; }
    const data = await res.json();
    const cards = data.data;
    const select = $("model-select");
    const show = () => {
      const card = cards.find((c) => c.id === select.value) || cards[0];
      $("model-name").textContent = `model: ${card.id} (context ${card.max_context} tokens)`;
      $("max-tokens").max = String(card.max_tokens);
    };
    select.replaceChildren(...cards.map((c) => new Option(c.id, c.id)));
    select.hidden = cards.length < 2;  // several models: choose one
    select.onchange = show;
    if (cards.length) show(); else $("model-name").textContent = "no local model";
    const health = await (await fetch("/health")).json();
    $("arena-link").hidden = !health.arena;
  } catch (e) {
    $("model-name").textContent = "server unreachable";
  }
}

function init() {
  $("generate").addEventListener("click", generate);
  $("stop-btn").addEventListener("click", () => state.controller && state.controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
  });
  for (const id of ["temperature", "top-p"]) {
    $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
  }
  const out = $("output");
  const pick = (e) => {
    const span = e.target.closest(".tok");
    if (span) showDetail(parseInt(span.dataset.index, 10));
  };
  out.addEventListener("click", pick);
  out.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") pick(e); });
  $("api-key").addEventListener("change", loadModel);
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
