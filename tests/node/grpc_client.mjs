// The Node gRPC client (clients/node) against a real server: list models, stream, ping,
// cancel, resume after the TCP connection is cut, and the cut reported as an error without
// reconnect. Usage: node tests/node/grpc_client.mjs HOST:PORT. Prints one JSON result line.
import net from "node:net";
import { LLMProxyClient, LLMProxyError } from "../../clients/node/index.js";

const target = process.argv[2];
const [host, port] = [target.slice(0, target.lastIndexOf(":")), Number(target.slice(target.lastIndexOf(":") + 1))];
const PROMPTS = ["Explain quantum computing", "How does photosynthesis work?", "What is a black hole?"];
const FAST = { baseMs: 50, factor: 1.6, jitter: 0.2, capMs: 500 };
const result = {};

/** A TCP relay in front of the server whose connections can all be reset at once. */
function relay() {
  const sockets = new Set();
  const server = net.createServer((down) => {
    const up = net.connect(port, host);
    for (const s of [down, up]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    down.pipe(up).pipe(down);
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () =>
      resolve({
        address: `127.0.0.1:${server.address().port}`,
        cut: () => sockets.forEach((s) => s.resetAndDestroy()),
        close: () => new Promise((r) => (sockets.forEach((s) => s.destroy()), server.close(r))),
      }),
    ),
  );
}

const startThree = (client, maxTokens) =>
  PROMPTS.map((content) => client.stream({ model: "demo", messages: [{ role: "user", content }], seed: 5, maxTokens }));

async function readAll(handles, counts) {
  return Promise.all(
    handles.map(async (h) => {
      let text = "";
      for await (const t of h) {
        text += t;
        counts[h.id] = (counts[h.id] ?? 0) + 1;
      }
      return text;
    }),
  );
}

const waitFor = async (cond, ms, what) => {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
};

// 1. Models, ping, a direct read of three streams (the expected texts), and their done frames.
const direct = new LLMProxyClient(target, { reconnect: false });
result.models = (await direct.listModels()).map((m) => m.name);
result.pong = (await direct.ping(7)).nonce;
const handles = startThree(direct, 120);
const expected = await readAll(handles, {});
const done = await handles[0].done;
result.direct = { lengths: expected.map((t) => t.length), finish: done.finish_reason, tokens: done.timing.tokens, ttft_us: done.timing.ttft_us };
result.session = Boolean(direct.session?.session_id && direct.session?.resume_token);

// 2. Cancel after a few tokens: the stream ends with finish reason CANCELLED.
const long = direct.stream({ model: "demo", messages: [{ role: "user", content: "Tell me a long story" }], maxTokens: 2000 });
let seen = 0;
for await (const _ of long) if (++seen === 5) long.cancel();
const cancelled = await long.done;
result.cancel = { finish: cancelled.finish_reason, tokens_seen: seen };
direct.close();

// 3. Resume: every TCP connection reset mid-stream; the client reconnects, resumes, and the
// texts equal the direct read's: nothing lost, nothing repeated.
const r = await relay();
const client = new LLMProxyClient(r.address, { backoff: FAST });
const counts = {};
const resumed = startThree(client, 120);
const reading = readAll(resumed, counts);
await waitFor(() => resumed.every((h) => (counts[h.id] ?? 0) >= 25), 10000, "25 tokens on every stream");
r.cut();
const texts = await reading;
result.resume = {
  equal: JSON.stringify(texts) === JSON.stringify(expected),
  reconnects: client.reconnects,
  duplicates: resumed.reduce((n, h) => n + h.duplicates, 0),
};
client.close();

// 4. Without reconnect, the cut is an error: a cut stream is never reported as finished.
const noRetry = new LLMProxyClient(r.address, { reconnect: false });
const h = noRetry.stream({ model: "demo", messages: [{ role: "user", content: "hi" }], maxTokens: 500 });
for await (const _ of h) {
  r.cut();
  break;
}
try {
  await h.done;
  result.cut = { error: null };
} catch (err) {
  result.cut = { error: err instanceof LLMProxyError ? err.code : String(err) };
}
noRetry.close();
await r.close();
console.log(JSON.stringify(result));
process.exit(0);
