// Runs clients/js/llmproxy.js in Node against a live bridge and prints one JSON
// object of what it saw; tests/integration/test_js_client.py judges it.
//
//   node --experimental-websocket tests/browser/js_client.mjs WS_URL SPEC_JSON
//
// SPEC_JSON: {"streams": {"q": prompt, ...}, "cancel": id, "cancel_after": n,
//             "seed": n, "max_tokens": n}

import { LLMProxyClient, LLMProxyError } from "../../clients/js/llmproxy.js";

const [wsUrl, specJson] = process.argv.slice(2);
const spec = JSON.parse(specJson);
const watchdog = setTimeout(() => {
  console.error("js_client.mjs: watchdog fired after 60 s");
  process.exit(3);
}, 60_000);
const now = () => performance.now();

const out = { states: [], order: [], streams: {} };
const client = new LLMProxyClient(wsUrl, {
  WebSocket: globalThis.WebSocket, // the option, exercised explicitly
  onStateChange: (state, previous) => out.states.push([previous, state]),
});
await client.connect();
out.rttMs = await client.ping();

// Three (or more) streams at once on the one socket.
const handles = {};
for (const [id, prompt] of Object.entries(spec.streams)) {
  const rec = { tokens: [], frames: [], cancelAt: null, tokensAfterCancel: 0 };
  out.streams[id] = rec;
  const h = client.stream(
    { id, model: "demo", messages: [{ role: "user", content: prompt }], seed: spec.seed, max_tokens: spec.max_tokens },
    {
      onToken: (text, frame) => {
        rec.tokens.push(text);
        out.order.push(id);
        if (rec.cancelAt !== null) rec.tokensAfterCancel += 1;
        if (id === spec.cancel && rec.tokens.length === spec.cancel_after) {
          rec.cancelAt = now();
          h.cancel();
        }
      },
      onFrame: (frame) => {
        rec.frames.push({ type: frame.type, seq: frame.seq, count: frame.count ?? 1 });
        if (frame.type === "done" || frame.type === "error") rec.doneAt = now();
      },
    },
  );
  handles[id] = h;
}

// One stream is read by async iteration instead of callbacks: same text.
const [firstId] = Object.keys(handles);
const iterated = (async () => {
  const parts = [];
  for await (const t of handles[firstId]) parts.push(t);
  return parts.join("");
})();
iterated.catch(() => {}); // awaited below; a failure must not crash the script first

const settled = await Promise.allSettled(Object.values(handles).map((h) => h.done));
Object.keys(handles).forEach((id, i) => {
  const rec = out.streams[id];
  const s = settled[i];
  rec.status = s.status;
  rec.done = s.status === "fulfilled" ? s.value : null;
  rec.cancelToDoneMs = rec.cancelAt === null ? null : rec.doneAt - rec.cancelAt;
  rec.text = handles[id].text;
  rec.state = handles[id].state;
  rec.lastSeq = handles[id].lastSeq;
});
out.iteratedText = await iterated.catch((err) => `error: ${err.code}`);
out.iteratedId = firstId;

// An error frame (unknown model) must reject `done` with a typed error, and
// iterating the stream must throw the same error: never a finished stream.
const bad = client.stream({ model: "no-such-model", messages: [{ role: "user", content: "hi" }] });
try {
  const value = await bad.done;
  out.error = { resolved: true, value };
} catch (err) {
  out.error = {
    resolved: false,
    isLLMProxyError: err instanceof LLMProxyError,
    name: err.name,
    code: err.code,
    detail: err.detail,
    retryable: err.retryable,
    retryAfterMs: err.retryAfterMs,
    streamId: err.streamId,
    state: bad.state,
  };
  try {
    for await (const _ of bad);
    out.error.iterationThrew = false;
  } catch (again) {
    out.error.iterationThrew = again === err;
  }
}

// The connection is still usable after the rejected start.
const after = client.stream({ model: "demo", messages: [{ role: "user", content: "What is a black hole?" }], max_tokens: 5 });
out.afterError = { finish: (await after.done).finish_reason, text: after.text };

// A duplicate live id is refused locally, before anything is sent.
const live = client.stream({ id: "dup", model: "demo", messages: [{ role: "user", content: "hi" }], max_tokens: 50 });
try {
  client.stream({ id: "dup", model: "demo", messages: [{ role: "user", content: "hi" }] });
  out.duplicate = "accepted";
} catch (err) {
  out.duplicate = err.code;
}
// Closing the client ends a live stream with a typed error, not as finished.
await client.close();
out.closedStream = await live.done.then(
  () => "resolved",
  (err) => err.code,
);
out.finalState = client.state;
clearTimeout(watchdog);
console.log(JSON.stringify(out));
