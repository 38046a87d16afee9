// The JavaScript client in headless Chromium on a page where WebSockets are refused (its
// `WebSocket` constructor throws): it must fall back to the SSE transport by itself, stream,
// survive a dropped event stream (EventSource reopened after the last event id) and a dropped
// connection (the protocol's resume) with the exact text, and cancel. Prints one JSON object.
//
//   node tests/browser/sse_fallback.mjs BRIDGE_HTTP_URL SSE_URL SPEC_JSON
//
// SPEC_JSON: {"prompt": str, "seed": n, "max_tokens": n, "drop_after": n}

import { rmSync } from "node:fs";

import { launchChromium } from "./chromium.mjs";

const [httpUrl, sseUrl, specJson] = process.argv.slice(2);
const spec = JSON.parse(specJson);
const watchdog = setTimeout(() => {
  console.error("sse_fallback.mjs: watchdog fired after 60 s");
  process.exit(3);
}, 60_000);

const { context, userDataDir } = await launchChromium({ width: 800, height: 600 });
const result = { pageErrors: [], webSockets: 0 };
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(30_000);
  page.on("pageerror", (err) => result.pageErrors.push(String(err)));
  page.on("websocket", () => (result.webSockets += 1));
  await page.addInitScript(() => {
    window.WebSocket = function WebSocket() {
      throw new DOMException("WebSockets are blocked on this network", "SecurityError");
    };
  });
  await page.goto(`${httpUrl.replace(/\/$/, "")}/healthz`); // any page of the bridge's origin
  const wsUrl = httpUrl.replace(/^http/, "ws").replace(/\/$/, "") + "/stream";
  Object.assign(
    result,
    await page.evaluate(
      async ({ wsUrl, sseUrl, spec }) => {
        const { LLMProxyClient } = await import("/js/llmproxy.js");
        const client = new LLMProxyClient(wsUrl, { sseUrl, backoff: { baseMs: 50, factor: 1.6, jitter: 0.2, maxMs: 500 } });
        const request = { model: "demo", messages: [{ role: "user", content: spec.prompt }], seed: spec.seed, max_tokens: spec.max_tokens };
        const out = {};
        await client.connect();
        out.transport = client.transport;

        // 1. A whole stream.
        const whole = client.stream({ ...request, id: "whole" });
        out.wholeDone = (await whole.done).finish_reason;
        out.whole = whole.text;

        // 2. The event stream drops mid-answer; the EventSource reopens after the last event id.
        let tokens = 0;
        const socket = client._ws;
        const dropped = client.stream(
          { ...request, id: "dropped" },
          { onToken: () => ++tokens === spec.drop_after && socket.dropEventStream() },
        );
        out.droppedDone = (await dropped.done).finish_reason;
        out.dropped = dropped.text;
        out.droppedDuplicates = dropped.duplicates;
        out.eventStreams = socket.eventStreams;

        // 3. The whole connection drops: a new SSE session resumes the old one.
        tokens = 0;
        const session = client.session.session_id;
        const resumed = client.stream({ ...request, id: "resumed" }, { onToken: () => ++tokens === spec.drop_after && client.dropConnection() });
        out.resumedDone = (await resumed.done).finish_reason;
        out.resumed = resumed.text;
        out.reconnects = client.reconnects;
        out.sameSession = client.session.session_id === session;
        out.transportAfter = client.transport;

        // 4. Cancel.
        tokens = 0;
        const cancelled = client.stream({ ...request, id: "cancelled" }, { onToken: (t) => ++tokens === 3 && cancelled.cancel() });
        out.cancelled = (await cancelled.done).finish_reason;
        out.cancelledTokens = tokens;
        await client.close();
        out.state = client.state;
        return out;
      },
      { wsUrl, sseUrl, spec },
    ),
  );
} finally {
  clearTimeout(watchdog);
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
