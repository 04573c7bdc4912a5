// lmforge arena: a rater sees two anonymous answers to one prompt, streamed side by side,
// and votes A, B, tie or both bad (keys 1-4 or A/B/T/X); the server reveals the models
// after the vote. In a study the server picks each item; otherwise the rater types prompts.
// Plain JS, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const RATER = /^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$/;
const CHOICE_NAMES = { a: "A is better", b: "B is better", tie: "tie", both_bad: "both bad" };
const KEYS = { "1": "a", a: "a", "2": "b", b: "b", "3": "tie", t: "tie", "4": "both_bad", x: "both_bad" };
const state = { rater: null, info: null, battle: null, ready: false, voted: false, busy: false, controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorOf(res) {
  try {
    const err = (await res.json()).error;
    return { message: err.message, code: err.code };
  } catch (e) {
    return { message: `HTTP ${res.status}`, code: null };
  }
}

function setStatus(text) { $("status").textContent = text; }

function showProgress(p) {
  if (!p) return;
  $("progress").textContent = p.total !== undefined ? `${p.done} of ${p.total} rated` : `${p.done} rated`;
}

async function loadInfo() {
  const query = state.rater ? `?rater=${encodeURIComponent(state.rater)}` : "";
  const res = await fetch("/arena/api/info" + query, { headers: headers() });
  if (!res.ok) throw new Error((await errorOf(res)).message);
  state.info = await res.json();
  $("arena-mode").textContent = state.info.mode === "study"
    ? `study of ${state.info.total} items, ${state.info.models} models` : `free prompts, ${state.info.models} models`;
  showProgress(state.info);
  return state.info;
}

function studyComplete() {
  return state.info && state.info.mode === "study" && state.info.done >= state.info.total;
}

async function start() {
  const rater = $("rater").value.trim();
  if (!RATER.test(rater)) {
    setStatus("A rater id is 1-64 letters, digits or . _ @ - (starting with a letter or digit).");
    return;
  }
  state.rater = rater;
  localStorage.setItem("lmforge-arena-rater", rater);
  try {
    await loadInfo();
  } catch (err) {
    setStatus("Error: " + err.message);
    return;
  }
  $("rater").disabled = true;
  $("start").disabled = true;
  if (state.info.mode === "free") {
    $("free").hidden = false;
    $("prompt").focus();
    setStatus("Type a prompt and ask both models.");
  } else if (studyComplete()) {
    setStatus(`You have rated all ${state.info.total} items of this study. Thank you!`);
  } else {
    nextBattle();
  }
}

function resetBattle() {
  for (const side of ["a", "b"]) {
    $(`answer-${side}`).textContent = "";
    $(`side-${side}`).className = "answer streaming";
  }
  for (const b of document.querySelectorAll("button.vote")) { b.disabled = true; b.classList.remove("chosen"); }
  $("reason").value = "";
  $("result").hidden = true;
  $("next").hidden = true;
  $("battle").hidden = false;
  state.battle = null;
  state.ready = false;
  state.voted = false;
}

function handleEvent(ev) {
  if (ev.type === "battle") {
    state.battle = ev.battle;
    $("shown-prompt").textContent = ev.prompt;
    showProgress(ev);
  } else if (ev.type === "piece") {
    $(`answer-${ev.side}`).textContent += ev.text;
  } else if (ev.type === "end") {
    const box = $(`side-${ev.side}`);
    box.classList.remove("streaming");
    if (ev.error) {
      box.classList.add("failed");
      $(`answer-${ev.side}`).textContent += `\n[this answer failed: ${ev.error}]`;
    }
  } else if (ev.type === "ready") {
    state.ready = true;
    for (const b of document.querySelectorAll("button.vote")) b.disabled = false;
    setStatus("Which answer is better?");
  }
}

async function nextBattle() {
  if (state.busy) return;
  const body = { rater: state.rater };
  if (state.info.mode === "free") {
    body.prompt = $("prompt").value;
    if (!body.prompt.trim()) { setStatus("Type a prompt first."); return; }
  }
  state.busy = true;
  resetBattle();
  setStatus("The two models are answering…");
  state.controller = new AbortController();
  try {
    const res = await fetch("/arena/api/battles", { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.controller.signal });
    if (!res.ok) {
      const err = await errorOf(res);
      if (err.code === "study_complete") { await loadInfo(); $("battle").hidden = true; }
      throw new Error(err.message);
    }
    await readEvents(res, (data) => handleEvent(JSON.parse(data)));
    if (!state.ready) setStatus("An answer failed: this battle cannot be rated. Try the next one.");
    if (!state.ready) $("next").hidden = false;
  } catch (err) {
    if (err.name !== "AbortError") setStatus("Error: " + err.message);
  } finally {
    state.busy = false;
    state.controller = null;
  }
}

async function vote(choice) {
  if (!state.ready || state.voted || !state.battle) return;
  state.voted = true;
  const buttons = document.querySelectorAll("button.vote");
  for (const b of buttons) { b.disabled = true; b.classList.toggle("chosen", b.dataset.choice === choice); }
  const body = { battle: state.battle, rater: state.rater, choice, reason: $("reason").value.slice(0, 1000) };
  const res = await fetch("/arena/api/votes", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!res.ok) {
    const err = await errorOf(res);
    setStatus("Vote not recorded: " + err.message);
    if (err.code !== "already_voted") {
      state.voted = false;
      for (const b of buttons) b.disabled = false;
    }
    return;
  }
  const out = await res.json();
  state.info = { ...state.info, done: out.done, total: out.total };
  showProgress(out);
  const result = $("result");
  result.textContent = `Your vote: ${CHOICE_NAMES[choice]}. A was ${out.revealed.a}, B was ${out.revealed.b}.`;
  result.hidden = false;
  if (studyComplete()) {
    setStatus(`You have rated all ${out.total} items of this study. Thank you!`);
  } else {
    $("next").hidden = false;
    setStatus(state.info.mode === "study" ? "Press N for the next item." : "Type another prompt, or press N to ask again.");
  }
}

function next() {
  if (!state.rater || state.busy || studyComplete()) return;
  if (state.info.mode === "free" && !state.voted && state.ready) return;  // vote first
  if (state.info.mode === "free") { $("prompt").focus(); $("prompt").select(); }
  nextBattle();
}

function onKey(e) {
  const typing = e.target.closest("input, textarea");
  if (e.target.id === "prompt" && e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); nextBattle(); return; }
  if (e.target.id === "rater" && e.key === "Enter") { start(); return; }
  if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
  const key = e.key.toLowerCase();
  if (KEYS[key]) { e.preventDefault(); vote(KEYS[key]); }
  else if (key === "n" && !$("next").hidden) { e.preventDefault(); next(); }
}

function init() {
  const saved = localStorage.getItem("lmforge-arena-rater");
  if (saved) $("rater").value = saved;
  $("start").addEventListener("click", start);
  $("ask").addEventListener("click", nextBattle);
  $("next").addEventListener("click", next);
  for (const b of document.querySelectorAll("button.vote")) b.addEventListener("click", () => vote(b.dataset.choice));
  document.addEventListener("keydown", onKey);
  loadInfo().catch((err) => { $("arena-mode").textContent = "unavailable: " + err.message; });
}

document.addEventListener("DOMContentLoaded", init);
