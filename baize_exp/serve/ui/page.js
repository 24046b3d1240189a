"use strict";
// The chat page. Every model answer is put on the page with textContent, never as markup.
const token = new URLSearchParams(location.search).get("token");
if (token) history.replaceState(null, "", location.pathname); // the token stays in memory, not in the address bar
const auth = token ? { Authorization: "Bearer " + token } : {};
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function errorText(data, status) {
  const e = data && (data.error || data.detail);
  return (typeof e === "string" ? e : e && e.message) || "HTTP " + status;
}

async function post(path, body) {
  return fetch(path, { method: "POST", headers: { ...auth, "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

async function api(path, body) {
  const res = body === undefined ? await fetch(path, { headers: auth }) : await post(path, body);
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error(errorText(data, res.status));
  return data;
}

// Server-sent events from a fetch response: yields each `data:` payload parsed, until [DONE] or the end.
async function* events(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function settings() {
  const s = {
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
    max_tokens: parseInt($("max_tokens").value, 10),
  };
  if ($("seed").value !== "") s.seed = parseInt($("seed").value, 10);
  return s;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// ---- chat: one pane per picked model, each with its own history --------------------------------------------
let MODELS = [];
const histories = {}; // label -> [{role, content}]
let busy = false;

function pickedModels() {
  return [...document.querySelectorAll("#model-picks input:checked")].map((i) => i.value);
}

function paneOf(label) {
  return document.querySelector(`.pane[data-model="${CSS.escape(label)}"]`);
}

function addMessage(label, role, text) {
  const msg = el("div", "msg " + (role === "user" ? "user" : "ai"), text);
  paneOf(label).querySelector(".log").append(msg);
  return msg;
}

function renderPanes() {
  const panes = $("panes");
  panes.replaceChildren();
  for (const label of pickedModels()) {
    const m = MODELS.find((x) => x.label === label);
    const pane = el("div", "pane");
    pane.dataset.model = label;
    const head = el("div", "pane-head");
    const exportButton = el("button", "small", "Export");
    exportButton.type = "button";
    exportButton.title = "this conversation as a dialog in the training format (JSON lines)";
    exportButton.addEventListener("click", () => exportDialog(label));
    head.append(el("h2", "", label), el("span", "fmt", m.format), exportButton);
    pane.append(head, el("div", "log"));
    panes.append(pane);
    for (const msg of histories[label] || []) addMessage(label, msg.role, msg.content);
  }
}

async function streamAnswer(label, history, bubble) {
  const res = await post("/v1/chat/completions", { model: label, messages: history, stream: true, ...settings() });
  if (!res.ok) throw new Error(errorText(await res.json().catch(() => null), res.status));
  let text = "";
  for await (const chunk of events(res)) {
    if (chunk.error) throw new Error(chunk.error.message);
    const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
    if (delta && delta.content) {
      text += delta.content;
      bubble.textContent = text;
    }
  }
  return text;
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value;
  const labels = pickedModels();
  if (busy || !text.trim() || !labels.length) return;
  busy = true;
  $("send").disabled = true;
  $("chat-input").value = "";
  status("");
  await Promise.all(
    labels.map(async (label) => {
      const history = (histories[label] = histories[label] || []);
      history.push({ role: "user", content: text });
      addMessage(label, "user", text);
      const bubble = addMessage(label, "ai", "");
      bubble.classList.add("streaming");
      try {
        const answer = await streamAnswer(label, history, bubble);
        history.push({ role: "assistant", content: answer });
      } catch (err) {
        history.pop(); // the question stays on screen, but the next turn is asked without it
        bubble.classList.add("error");
        bubble.textContent = "error: " + err.message;
      }
      bubble.classList.remove("streaming");
    }),
  );
  busy = false;
  $("send").disabled = false;
}

async function exportDialog(label) {
  try {
    const dialog = await api("/api/export", { model: label, messages: histories[label] || [] });
    const blob = new Blob([JSON.stringify(dialog) + "\n"], { type: "application/jsonl" });
    const a = el("a");
    a.href = URL.createObjectURL(blob);
    a.download = `dialog-${label.replace(/[^\w.-]+/g, "_")}.jsonl`;
    a.click();
    URL.revokeObjectURL(a.href);
    status(`exported the conversation with ${label} (${dialog.turns.length} turns)`);
  } catch (err) {
    status("export: " + err.message, true);
  }
}

// ---- the blind arena ------------------------------------------------------------------------------------------
let pairId = null;
const slotBox = (slot) => $("arena-" + slot).querySelector(".answer");
const voteButtons = () => [...document.querySelectorAll("#votes button")];

async function battle(body) {
  pairId = null;
  voteButtons().forEach((b) => (b.disabled = true));
  for (const slot of ["A", "B"]) {
    slotBox(slot).textContent = "";
    slotBox(slot).className = "msg ai answer streaming";
    $("arena-" + slot).querySelector("h2").textContent = "Model " + slot;
  }
  $("arena-result").textContent = "";
  $("arena-question").textContent = "";
  $("arena-ask").disabled = $("arena-eval").disabled = true;
  try {
    const res = await post("/api/arena/start", body);
    if (!res.ok) throw new Error(errorText(await res.json().catch(() => null), res.status));
    for await (const ev of events(res)) {
      if (ev.type === "pair") {
        pairId = ev.pair_id;
        $("arena-question").textContent = ev.question;
      } else if (ev.type === "delta") {
        slotBox(ev.slot).textContent += ev.text;
      } else if (ev.type === "done") {
        slotBox(ev.slot).textContent = ev.text; // exactly the answer a vote records
        slotBox(ev.slot).classList.remove("streaming");
      } else if (ev.type === "error") {
        throw new Error(ev.message);
      } else if (ev.type === "ready") {
        voteButtons().forEach((b) => (b.disabled = false));
      }
    }
  } catch (err) {
    $("arena-result").textContent = "error: " + err.message;
  } finally {
    $("arena-ask").disabled = $("arena-eval").disabled = false;
    for (const slot of ["A", "B"]) slotBox(slot).classList.remove("streaming");
  }
}

async function vote(choice) {
  voteButtons().forEach((b) => (b.disabled = true));
  try {
    const r = await api("/api/arena/vote", { pair_id: pairId, vote: choice });
    $("arena-A").querySelector("h2").textContent = "Model A: " + r.reveal[0];
    $("arena-B").querySelector("h2").textContent = "Model B: " + r.reveal[1];
    $("arena-result").textContent = `Recorded. A was ${r.reveal[0]}, B was ${r.reveal[1]}.`;
    $("votes-count").textContent = r.votes;
  } catch (err) {
    $("arena-result").textContent = "vote not recorded: " + err.message;
  }
}

// ---- wiring ---------------------------------------------------------------------------------------------------
function showTab(name) {
  for (const t of ["chat", "arena"]) {
    $(t).hidden = t !== name;
    $("tab-" + t).classList.toggle("active", t === name);
  }
}

async function init() {
  const info = await api("/api/models");
  MODELS = info.models;
  for (const [key, value] of Object.entries(info.defaults)) $(key).value = value;
  MODELS.forEach((m, i) => {
    const label = el("label");
    const box = el("input");
    box.type = "checkbox";
    box.value = m.label;
    box.checked = i < 3;
    box.addEventListener("change", renderPanes);
    label.append(box, document.createTextNode(" " + m.label));
    $("model-picks").append(label);
  });
  $("votes-file").textContent = info.arena.votes_file;
  $("votes-count").textContent = info.arena.votes;
  renderPanes();
  $("chat-form").addEventListener("submit", send);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("new-chat").addEventListener("click", () => {
    for (const k of Object.keys(histories)) delete histories[k];
    renderPanes();
  });
  $("tab-chat").addEventListener("click", () => showTab("chat"));
  $("tab-arena").addEventListener("click", () => showTab("arena"));
  $("arena-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if ($("arena-input").value.trim()) battle({ prompt: $("arena-input").value, settings: settings() });
  });
  $("arena-eval").addEventListener("click", () => battle({ eval: true }));
  voteButtons().forEach((b) => b.addEventListener("click", () => vote(b.dataset.vote)));
}

init().catch((err) => status("could not load the models: " + err.message, true));
