// The demo chat page: one LLMProxyClient, one stream per question (two, side by
// side, in compare mode), tokens rendered as they arrive with their latency
// charted. Stop sends `cancel`; Edit changes the question while its answer
// streams (`modify`); when the connection drops (a bridge restart, a flaky
// network) the client reconnects and resumes, and the answer simply goes on.
//
// `?seed=N` in the page URL sends a seed with every question (the demo provider
// then streams at the same gaps every time: tests use it).

import { LLMProxyClient } from "/js/llmproxy.js";

const $ = (id) => document.getElementById(id);
const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/stream`;
const seedParam = new URLSearchParams(location.search).get("seed");
const SEED = seedParam === null || seedParam === "" ? undefined : Number(seedParam);

const ui = {
  transcript: $("transcript"),
  form: $("ask"),
  model: $("model"),
  prompt: $("prompt"),
  promptB: $("prompt-b"),
  compare: $("compare"),
  editNote: $("edit-note"),
  send: $("send"),
  edit: $("edit"),
  stop: $("stop"),
  conn: $("conn"),
  rtt: $("rtt"),
  status: $("status"),
  last: $("last-latency"),
  chart: $("chart"),
  ttft: $("ttft"),
  count: $("count"),
  rate: $("rate"),
  itl: $("itl"),
  finish: $("finish"),
  serverTiming: $("server-timing"),
  showLatency: $("show-latency"),
};

let client = null;
let current = null; // the running turn: {panes: [pane, ...], editing}
const history = []; // earlier turns, sent along with each question

const CONN_TEXT = { reconnecting: "reconnecting…", open: "open", connecting: "connecting", closed: "closed", idle: "idle", closing: "closing" };

function setStatus(state, text = state) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function getClient() {
  if (client === null || client.state === "closed") {
    client = new LLMProxyClient(url, {
      onStateChange: (state, previous) => {
        ui.conn.dataset.state = state;
        ui.conn.textContent = CONN_TEXT[state] ?? state;
        if (state === "open") measureRtt();
        if (state === "reconnecting") {
          ui.rtt.textContent = "rtt –";
          if (current) banner("connection lost: reconnecting, the answer will resume");
        }
        if (state === "open" && previous === "reconnecting" && current) banner("resumed: nothing lost, nothing repeated");
      },
    });
    client.connect().catch(() => {}); // shown by the state pill; streams report their own error
  }
  return client;
}

// A one-line note in the transcript (connection lost, resumed).
function banner(text) {
  const note = document.createElement("p");
  note.className = "banner";
  note.textContent = text;
  const pinned = isPinned();
  ui.transcript.append(note);
  if (pinned) scrollToEnd();
}

// -- latency chart ----------------------------------------------------------------

function drawChart(latencies) {
  const canvas = ui.chart;
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const slot = 6; // px per token, oldest on the left; scrolls once full
  const shown = latencies.slice(-Math.floor(width / slot));
  // The first token's latency is the TTFT: scale to the gaps so they stay readable
  // (a taller TTFT bar is clipped and drawn in the warning colour).
  const gaps = latencies.length === shown.length ? shown.slice(1) : shown;
  const top = Math.max(40, ...gaps) * 1.2;
  const css = getComputedStyle(document.documentElement);
  const colour = (name) => css.getPropertyValue(name).trim();
  ctx.fillStyle = colour("--grid");
  ctx.fillRect(0, height - 1, width, 1);
  shown.forEach((ms, i) => {
    const h = Math.max(2, Math.min(1, ms / top) * (height - 14));
    ctx.fillStyle = ms > top ? colour("--warn") : colour("--accent");
    ctx.fillRect(i * slot + 1, height - 1 - h, slot - 2, h);
  });
  ctx.fillStyle = colour("--muted");
  ctx.font = "10px system-ui, sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "top";
  ctx.fillText(shown.length ? `scale ${Math.round(top)} ms` : "no tokens yet", width - 2, 0);
}

// -- one question -----------------------------------------------------------------

// Follow the answer while the reader is at the bottom; leave them be if they scrolled up.
function isPinned() {
  const t = ui.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 40;
}

function scrollToEnd() {
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function addTurn(role, text, parent = ui.transcript) {
  $("empty")?.remove();
  const turn = document.createElement("article");
  turn.className = `turn ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  turn.append(body);
  parent.append(turn);
  scrollToEnd();
  return body;
}

function percentile(sorted, p) {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

const fmtMs = (ms) => (Number.isFinite(ms) ? `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms` : "–");

function showStats(run) {
  const n = run.tokens; // a frame may hold several tokens (`count`) when the reader lags
  ui.count.textContent = String(n);
  ui.ttft.textContent = run.firstAt ? fmtMs(run.firstAt - run.sentAt) : "–";
  const span = (run.lastAt - run.firstAt) / 1000;
  ui.rate.textContent = n > 1 && span > 0 ? ((n - 1) / span).toFixed(1) : "–";
  const gaps = run.latencies.slice(1).sort((a, b) => a - b);
  ui.itl.textContent = gaps.length ? `${fmtMs(percentile(gaps, 50))} / ${fmtMs(percentile(gaps, 95))}` : "–";
}

function addAnswer(parent, label) {
  const turn = document.createElement("article");
  turn.className = "turn assistant";
  if (label) {
    const tag = document.createElement("span");
    tag.className = "pane-label";
    tag.textContent = label;
    turn.append(tag);
  }
  const body = document.createElement("div");
  body.className = "body streaming";
  turn.append(body);
  parent.append(turn);
  return body;
}

function resetMeter(pane) {
  ui.finish.textContent = "–";
  ui.serverTiming.textContent = "";
  ui.last.textContent = "–";
  showStats(pane);
  drawChart([]);
}

function renderToken(pane, text, frame) {
  const t = performance.now();
  if (!pane.firstAt) pane.firstAt = t;
  pane.lastAt = t;
  pane.tokens += frame.count ?? 1;
  const ms = parseInt(frame.latency, 10);
  pane.latencies.push(ms);
  // The token's leading whitespace stays a plain text node, so lines wrap
  // as usual and a latency label sits under the word itself.
  const [, space, word] = /^(\s*)([\s\S]*)$/.exec(text);
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = word;
  span.dataset.ms = String(ms);
  span.title = `${frame.latency} · seq ${frame.seq}`;
  const pinned = isPinned();
  if (space) pane.answer.append(space);
  pane.answer.append(span);
  if (pane.meter) {
    ui.last.textContent = frame.latency;
    showStats(pane);
    drawChart(pane.latencies);
  }
  if (pinned) scrollToEnd();
}

// One stream in one pane. The first pane drives the meter.
function startPane(turn, pane) {
  const model = ui.model.value.trim() || "demo";
  const request = { model, messages: [...history, { role: "user", content: pane.prompt }] };
  if (SEED !== undefined) request.seed = SEED;
  pane.stream = getClient().stream(request, {
    onStarted: (frame) => pane.meter && setStatus("streaming", `streaming from ${frame.provider} · ${frame.upstream_model}`),
    onToken: (text, frame) => renderToken(pane, text, frame),
    onRestarted: (frame) => {
      // `modify` without keep_partial: the old partial answer is gone.
      if (!frame.keep_partial) pane.answer.replaceChildren();
      pane.answer.classList.remove("restarted");
      void pane.answer.offsetWidth; // restart the highlight animation
      pane.answer.classList.add("restarted");
      Object.assign(pane, { tokens: 0, latencies: [], sentAt: performance.now(), firstAt: 0, lastAt: 0 });
      if (pane.meter) {
        resetMeter(pane);
        setStatus("waiting", "restarted with the edited question");
      }
    },
  });
  pane.stream.done.then(
    (done) => {
      pane.state = done.finish_reason === "cancelled" ? "cancelled" : "done";
      if (pane.meter) {
        ui.finish.textContent = done.finish_reason;
        const t = done.timing;
        ui.serverTiming.textContent =
          `server: TTFT ${fmtMs(t.ttft_ms)} · ${t.tokens} tokens · ${t.tokens_per_s.toFixed(1)} tokens/s` +
          ` · ITL p50 ${fmtMs(t.itl_p50_ms)}, p95 ${fmtMs(t.itl_p95_ms)}, max ${fmtMs(t.itl_max_ms)}`;
      }
      if (done.finish_reason === "cancelled") pane.answer.classList.add("cut");
    },
    (error) => {
      pane.state = "error";
      pane.error = error;
      if (pane.meter) ui.finish.textContent = error.code;
      const note = document.createElement("p");
      note.className = "error-note";
      note.textContent = `${error.code}: ${error.detail}${error.retryable ? " (retryable)" : ""}`;
      if (pane.answer.childNodes.length === 0) pane.answer.parentElement.replaceWith(note); // nothing came
      else pane.answer.parentElement.after(note);
      scrollToEnd();
    },
  );
  pane.answer.parentElement.dataset.pane = pane.name;
  return pane.stream.done.catch(() => {}).finally(() => {
    const pinned = isPinned();
    pane.answer.classList.remove("streaming");
    pane.answer.parentElement.dataset.state = pane.state;
    if (pinned) scrollToEnd();
    if (pane.meter) {
      showStats(pane);
      drawChart(pane.latencies);
    }
  });
}

function ask(prompts) {
  $("empty")?.remove();
  const compare = prompts.length > 1;
  const panes = prompts.map((prompt, i) => ({
    name: compare ? "AB"[i] : "",
    prompt,
    tokens: 0,
    latencies: [],
    sentAt: performance.now(),
    firstAt: 0,
    lastAt: 0,
    meter: i === 0,
    state: "streaming",
  }));
  const turn = { panes, editing: false };
  current = turn;
  if (compare) {
    const users = document.createElement("div");
    users.className = "pair";
    const answers = document.createElement("div");
    answers.className = "pair";
    ui.transcript.append(users, answers);
    for (const pane of panes) {
      pane.userBody = addTurn("user", pane.prompt, users);
      pane.answer = addAnswer(answers, `${pane.name} · ${pane.prompt}`);
    }
  } else {
    panes[0].userBody = addTurn("user", panes[0].prompt);
    panes[0].answer = addAnswer(ui.transcript, "");
  }
  scrollToEnd();
  resetMeter(panes[0]);
  setStatus("waiting", "waiting for the first token");
  ui.send.disabled = true;
  ui.stop.disabled = false;
  ui.edit.disabled = false;

  Promise.all(panes.map((pane) => startPane(turn, pane))).then(() => {
    const states = panes.map((p) => p.state);
    if (states.includes("error")) {
      const e = panes.find((p) => p.error).error;
      setStatus("error", `error: ${e.detail}`);
    } else if (states.includes("cancelled")) setStatus("cancelled", "stopped: the server cancelled the stream");
    else {
      const reason = ui.finish.textContent;
      setStatus("done", reason === "length" ? "done (max_tokens reached)" : "done");
    }
    // The conversation goes on from the first pane's question and answer.
    if (panes[0].state !== "error") history.push({ role: "user", content: panes[0].prompt }, { role: "assistant", content: panes[0].stream.text });
    if (current === turn) current = null;
    leaveEdit();
    ui.send.disabled = false;
    ui.stop.disabled = true;
    ui.edit.disabled = true;
    ui.prompt.focus();
  });
}

// -- edit while streaming ----------------------------------------------------------

function enterEdit() {
  if (!current) return;
  current.editing = true;
  ui.form.dataset.mode = "edit";
  ui.editNote.hidden = false;
  ui.prompt.value = current.panes[0].prompt;
  ui.send.textContent = "Update";
  ui.send.disabled = false;
  ui.edit.disabled = true;
  ui.prompt.focus();
  ui.prompt.select();
}

function leaveEdit() {
  delete ui.form.dataset.mode;
  ui.editNote.hidden = true;
  ui.send.textContent = "Send";
  if (current) current.editing = false;
}

// The edited question replaces the running one (the first pane's): the server
// stops the old generation at once and streams the new answer under the same id.
function applyEdit(prompt) {
  const pane = current.panes[0];
  pane.prompt = prompt;
  pane.userBody.textContent = prompt;
  pane.userBody.classList.add("edited");
  const label = pane.answer.parentElement.querySelector(".pane-label");
  if (label) label.textContent = `${pane.name} · ${prompt}`;
  pane.stream.modify({ messages: [...history, { role: "user", content: prompt }], keepPartial: false }).catch(() => {});
  leaveEdit();
  ui.send.disabled = true;
  ui.edit.disabled = false;
  setStatus("waiting", "edited: restarting the answer");
}

// -- wiring -----------------------------------------------------------------------

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = ui.prompt.value.trim();
  if (!prompt) return;
  if (current?.editing) {
    ui.prompt.value = "";
    applyEdit(prompt);
    return;
  }
  if (current) return;
  const prompts = [prompt];
  if (ui.compare.checked) prompts.push(ui.promptB.value.trim() || prompt);
  ui.prompt.value = "";
  ui.promptB.value = "";
  ask(prompts);
});

for (const area of [ui.prompt, ui.promptB]) {
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.form.requestSubmit();
    }
    if (event.key === "Escape" && current?.editing) {
      leaveEdit();
      ui.prompt.value = "";
      ui.send.disabled = true;
      ui.edit.disabled = false;
    }
  });
}

ui.compare.addEventListener("change", () => {
  ui.promptB.hidden = !ui.compare.checked;
  ui.promptB.required = false;
});

ui.edit.addEventListener("click", enterEdit);

ui.stop.addEventListener("click", () => {
  if (!current) return;
  ui.stop.disabled = true;
  ui.edit.disabled = true;
  leaveEdit();
  setStatus("stopping", "stopping…");
  for (const pane of current.panes) pane.stream.cancel();
});

ui.showLatency.addEventListener("change", () => {
  ui.transcript.classList.toggle("show-latency", ui.showLatency.checked);
});

window.addEventListener("resize", () => drawChart(current ? current.panes[0].latencies : []));

// Round trip to the server, shown in the header while connected.
function measureRtt() {
  if (client?.state !== "open") return;
  client.ping({ timeoutMs: 4000 }).then(
    (ms) => (ui.rtt.textContent = `rtt ${fmtMs(ms)}`),
    () => (ui.rtt.textContent = "rtt –"),
  );
}
setInterval(measureRtt, 5000);

getClient();
ui.prompt.focus();
