// The live dashboard: one WebSocket to /stats, one JSON snapshot per second.
// It renders numbers, histograms and tables; it never receives keys or prompt text.

const $ = (id) => document.getElementById(id);
const history = [];
let snapshots = 0;

function fmtMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
}

function text(el, value) {
  if (el.textContent !== String(value)) el.textContent = value;
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function histogram(el, bounds, counts) {
  el.replaceChildren();
  const n = counts.length;
  const max = Math.max(1, ...counts);
  const w = 560 / n;
  counts.forEach((c, i) => {
    const h = (c / max) * 88;
    el.append(svg("rect", { x: i * w + w * 0.18, y: 110 - h, width: w * 0.64, height: Math.max(h, c ? 2 : 0), rx: 3, class: "bar" }));
    const label = bounds[i] ? `≤${bounds[i] >= 1000 ? bounds[i] / 1000 + "s" : bounds[i]}` : `>${bounds[i - 1] >= 1000 ? bounds[i - 1] / 1000 + "s" : bounds[i - 1]}`;
    const t = svg("text", { x: i * w + w / 2, y: 126, class: "axis" });
    t.textContent = label;
    el.append(t);
    if (c) {
      const v = svg("text", { x: i * w + w / 2, y: 106 - h, class: "count" });
      v.textContent = c;
      el.append(v);
    }
  });
}

function sparkline(el, values) {
  el.replaceChildren();
  if (values.length < 2) return;
  const max = Math.max(1, ...values);
  const pts = values.map((v, i) => `${(i / (values.length - 1)) * 120},${27 - (v / max) * 25}`).join(" ");
  el.append(svg("polyline", { points: pts, class: "line" }));
}

function rows(table, items, cells) {
  const body = table.tBodies[0];
  body.replaceChildren(
    ...(items.length ? items : [null]).map((item) => {
      const tr = document.createElement("tr");
      if (!item) {
        const td = document.createElement("td");
        td.colSpan = table.tHead.rows[0].cells.length;
        td.className = "empty";
        td.textContent = "no streams in the last minute";
        tr.append(td);
        return tr;
      }
      for (const [value, cls] of cells(item)) {
        const td = document.createElement("td");
        td.textContent = value;
        if (cls) td.className = cls;
        tr.append(td);
      }
      return tr;
    }),
  );
}

function render(s) {
  snapshots += 1;
  document.body.dataset.snapshots = snapshots;
  text($("active"), s.active_streams);
  text($("tps"), Math.round(s.tokens_per_s).toLocaleString());
  text($("sessions"), s.sessions);
  text($("ended"), s.ended_1m);
  text($("errors"), s.ended_1m ? `${((100 * s.errors_1m) / s.ended_1m).toFixed(1)} %` : "–");
  text($("ux"), s.ended_1m ? s.ux_score.toFixed(2) : "–");
  // the response cache: hit rate, and the tokens and provider time its replays saved
  const hits = s.cache_hits_1m || 0;
  text($("cache-hits"), s.ended_1m ? `${((100 * hits) / s.ended_1m).toFixed(1)} %` : "–");
  text($("cache-saved"), hits ? `${Number(s.cache_saved_tokens_1m || 0).toLocaleString()} tok · ${((s.cache_saved_ms_1m || 0) / 1000).toFixed(1)} s` : "–");
  text($("prompt-cached"), Number(s.cached_input_tokens_1m || 0).toLocaleString());
  history.push(s.tokens_per_s);
  if (history.length > 60) history.shift();
  sparkline($("tps-spark"), history);
  histogram($("ttft-hist"), s.ttft_bounds_ms, s.ttft_counts);
  histogram($("itl-hist"), s.itl_bounds_ms, s.itl_counts);
  // failed attempts, retries and failovers: the router's work the streams' own figures hide
  // (a deployment whose attempts all failed over has a row with no streams of its own)
  rows($("deployments"), s.deployments, (d) => [
    [d.name], [d.provider || "–"], [d.streams], [d.errors, d.errors ? "bad" : ""],
    [d.streams ? fmtMs(d.ttft_p50_ms) : "–"],
    [d.failed_attempts || 0, d.failed_attempts ? "bad" : ""], [d.retries || 0, d.retries ? "warn" : ""],
    [d.failovers || 0, d.failovers ? "warn" : ""],
    [d.breaker || "–", d.breaker === "open" ? "bad" : d.breaker === "half_open" ? "warn" : ""],
  ]);
  rows($("slowest"), s.slowest, (r) => [
    [r.stream_id, "mono"], [r.model], [r.deployment], [fmtMs(r.ttft_ms)], [fmtMs(r.total_ms)], [r.tokens],
    [r.status, ["stop", "length", "tool_calls", "cancelled"].includes(r.status) ? "" : "bad"],
  ]);
}

// With client keys configured, the feed needs one: it is sent as the bearer subprotocol (never in
// the URL) and kept only in this tab's sessionStorage.
const KEY = "llmproxy.dashboard.key";
$("keyform").onsubmit = (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("keyform").hidden = true;
  connect();
};

function connect(attempt = 0) {
  const key = sessionStorage.getItem(KEY);
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/stats`;
  const ws = key ? new WebSocket(url, ["llmproxy", `llmproxy.bearer.${key}`]) : new WebSocket(url);
  ws.onopen = () => { attempt = 0; $("conn").textContent = "live"; $("conn").className = "badge live"; };
  ws.onmessage = (event) => render(JSON.parse(event.data));
  ws.onclose = (event) => {
    if (event.code === 1008) {  // unauthenticated: ask for a key instead of retrying
      sessionStorage.removeItem(KEY);
      $("conn").textContent = "key needed";
      $("conn").className = "badge warn";
      $("keyform").hidden = false;
      return;
    }
    $("conn").textContent = "reconnecting";
    $("conn").className = "badge warn";
    setTimeout(() => connect(attempt + 1), Math.min(10000, 500 * 1.6 ** attempt));
  };
}

connect();
