// The demo chat page: one LLMProxyClient, one stream per question, tokens
// rendered as they arrive with their latency charted; Stop sends `cancel`.

import { LLMProxyClient } from "/js/llmproxy.js";

const $ = (id) => document.getElementById(id);
const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/stream`;

const ui = {
  transcript: $("transcript"),
  form: $("ask"),
  model: $("model"),
  prompt: $("prompt"),
  send: $("send"),
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
let current = null; // {stream, answer, latencies, sentAt, firstAt, lastAt}
const history = []; // earlier turns, sent along with each question

function setStatus(state, text = state) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function getClient() {
  if (client === null || client.state === "closed") {
    client = new LLMProxyClient(url, {
      onStateChange: (state) => {
        ui.conn.dataset.state = state;
        ui.conn.textContent = state;
        if (state === "open") measureRtt();
      },
    });
    client.connect().catch(() => {}); // shown by the state pill; streams report their own error
  }
  return client;
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

function addTurn(role, text) {
  $("empty")?.remove();
  const turn = document.createElement("article");
  turn.className = `turn ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  turn.append(body);
  ui.transcript.append(turn);
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

function ask(prompt) {
  const model = ui.model.value.trim() || "demo";
  const messages = [...history, { role: "user", content: prompt }];
  addTurn("user", prompt);
  const answer = addTurn("assistant", "");
  answer.classList.add("streaming");
  const run = { answer, tokens: 0, latencies: [], sentAt: performance.now(), firstAt: 0, lastAt: 0, stream: null };
  current = run;
  ui.finish.textContent = "–";
  ui.serverTiming.textContent = "";
  ui.last.textContent = "–";
  showStats(run);
  drawChart([]);
  setStatus("waiting", "waiting for the first token");
  ui.send.disabled = true;
  ui.stop.disabled = false;

  run.stream = getClient().stream(
    { model, messages },
    {
      onStarted: (frame) => setStatus("streaming", `streaming from ${frame.provider} · ${frame.upstream_model}`),
      onToken: (text, frame) => {
        const t = performance.now();
        if (!run.firstAt) run.firstAt = t;
        run.lastAt = t;
        run.tokens += frame.count ?? 1;
        const ms = parseInt(frame.latency, 10);
        run.latencies.push(ms);
        // The token's leading whitespace stays a plain text node, so lines wrap
        // as usual and a latency label sits under the word itself.
        const [, space, word] = /^(\s*)([\s\S]*)$/.exec(text);
        const span = document.createElement("span");
        span.className = "tok";
        span.textContent = word;
        span.dataset.ms = String(ms);
        span.title = `${frame.latency} · seq ${frame.seq}`;
        if (space) answer.append(space);
        const pinned = isPinned();
        answer.append(span);
        ui.last.textContent = frame.latency;
        showStats(run);
        drawChart(run.latencies);
        if (pinned) scrollToEnd();
      },
    },
  );

  run.stream.done.then(
    (done) => {
      ui.finish.textContent = done.finish_reason;
      const t = done.timing;
      ui.serverTiming.textContent =
        `server: TTFT ${fmtMs(t.ttft_ms)} · ${t.tokens} tokens · ${t.tokens_per_s.toFixed(1)} tokens/s` +
        ` · ITL p50 ${fmtMs(t.itl_p50_ms)}, p95 ${fmtMs(t.itl_p95_ms)}, max ${fmtMs(t.itl_max_ms)}`;
      if (done.finish_reason === "cancelled") {
        setStatus("cancelled", "stopped: the server cancelled the stream");
        answer.classList.add("cut");
      } else {
        setStatus("done", done.finish_reason === "length" ? "done (max_tokens reached)" : "done");
      }
      history.push({ role: "user", content: prompt }, { role: "assistant", content: run.stream.text });
    },
    (error) => {
      ui.finish.textContent = error.code;
      setStatus("error", `error: ${error.detail}`);
      const note = document.createElement("p");
      note.className = "error-note";
      note.textContent = `${error.code}: ${error.detail}${error.retryable ? " (retryable)" : ""}`;
      if (answer.childNodes.length === 0) answer.parentElement.replaceWith(note); // nothing came
      else answer.parentElement.after(note);
      scrollToEnd();
    },
  ).finally(() => {
    const pinned = isPinned();
    answer.classList.remove("streaming");
    if (pinned) scrollToEnd();
    if (current === run) current = null;
    ui.send.disabled = false;
    ui.stop.disabled = true;
    showStats(run);
    drawChart(run.latencies);
    ui.prompt.focus();
  });
}

// -- wiring -----------------------------------------------------------------------

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = ui.prompt.value.trim();
  if (!prompt || current) return;
  ui.prompt.value = "";
  ask(prompt);
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => {
  if (!current) return;
  ui.stop.disabled = true;
  setStatus("stopping", "stopping…");
  current.stream.cancel();
});

ui.showLatency.addEventListener("change", () => {
  ui.transcript.classList.toggle("show-latency", ui.showLatency.checked);
});

window.addEventListener("resize", () => drawChart(current ? current.latencies : []));

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
