// `modify` and `close()` of clients/js/llmproxy.js in Node against a live bridge;
// prints one JSON object; tests/integration/test_js_resume.py judges it.
//
//   node --experimental-websocket tests/browser/js_session.mjs WS_URL
//
// 1. "m": after 5 tokens of one question, modify it to another (partial dropped).
// 2. "k": after 5 tokens, append an instruction with keepPartial (partial kept).
// 3. A second client drops its socket (close code 4000): its session must stay.
// 4. The first client closes (code 1000) with a stream running: its session must end.

import { LLMProxyClient } from "../../clients/js/llmproxy.js";

const [wsUrl] = process.argv.slice(2);
const watchdog = setTimeout(() => {
  console.error("js_session.mjs: watchdog fired after 50 s");
  process.exit(3);
}, 50_000);
const now = () => performance.now();
const user = (content) => [{ role: "user", content }];

const out = {};
const client = new LLMProxyClient(wsUrl);
await client.connect();

function modifyAfter(id, n, change) {
  const rec = { tokensBefore: 0, tokensBetween: 0, seqs: [], keepPartial: Boolean(change.keepPartial) };
  let modifiedAt = null;
  let restartedAt = null;
  const h = client.stream(
    { id, model: "demo", messages: user("Explain quantum computing"), seed: 1, max_tokens: 30 },
    {
      onFrame: (frame) => rec.seqs.push(frame.seq),
      onToken: () => {
        if (modifiedAt === null) {
          rec.tokensBefore += 1;
          if (rec.tokensBefore === n) {
            rec.textBefore = h.text;
            modifiedAt = now();
            h.modify(change).then((frame) => (rec.restartedFrame = frame));
          }
        } else if (restartedAt === null) {
          rec.tokensBetween += 1; // a token of the old generation after the modify
        }
      },
      onRestarted: () => {
        restartedAt = now();
        rec.restartedMs = restartedAt - modifiedAt;
      },
    },
  );
  return h.done.then(
    () => ({ ...rec, finish: "done", text: h.text, restarts: h.restarts, seqsIncreasing: rec.seqs.every((s, i) => i === 0 || s > rec.seqs[i - 1]) }),
    (err) => ({ ...rec, finish: err.code }),
  );
}

[out.modify, out.keep] = await Promise.all([
  modifyAfter("m", 5, { messages: user("What is a black hole?") }),
  modifyAfter("k", 5, { append: user("Now in one sentence, please."), keepPartial: true }),
]);

// A dropped connection keeps the session resumable.
const other = new LLMProxyClient(wsUrl, { reconnect: false });
await other.connect();
const running = other.stream({ model: "demo", messages: user("What is a black hole?"), max_tokens: 400 });
await new Promise((resolve) => (running.onToken = resolve));
out.droppedSession = { session_id: other.session.session_id, resume_token: other.session.resume_token };
other.dropConnection();

// close() ends the session, with a stream still running.
const last = client.stream({ model: "demo", messages: user("What is a black hole?"), max_tokens: 400 });
await new Promise((resolve) => (last.onToken = resolve));
out.closedSession = { session_id: client.session.session_id, resume_token: client.session.resume_token };
await client.close();
out.closedStream = await last.done.then(() => "resolved", (err) => err.code);
out.finalState = client.state;
clearTimeout(watchdog);
console.log(JSON.stringify(out));
