// Drives a framework adapter's page (tests/browser/pages/vue.html or rxjs.html) in headless
// Chromium against a real bridge: a long answer stopped (nothing arrives after), a modify
// (back to waiting, then streaming again), a short answer to the end with its timing, and an
// unknown model as an error state. Prints one JSON object; tests/integration/test_frameworks.py
// judges it.
//
//   node tests/browser/framework_page.mjs BRIDGE_HTTP_URL vue|rxjs QUIET_MS
//
// The page is served the way a Vue or Angular app is: by its own (dev) server, here a static
// HTTP server of this script on 127.0.0.1, from tests/browser/pages/, clients/js/ (the
// client and the adapters, as the bridge serves them under /js/) and clients/js/node_modules/
// (Vue's and RxJS's browser builds). Its WebSocket goes to the real bridge (`?ws=`), which
// accepts loopback origins while it runs on loopback without keys (docs/security.md).

import { readFileSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";

import { launchChromium } from "./chromium.mjs";

const [httpUrl, pageName, quietArg] = process.argv.slice(2);
const quietMs = Number(quietArg ?? 600);
const root = fileURLToPath(new URL("../..", import.meta.url));
const SERVED = {
  "/pages/": join(root, "tests/browser/pages"),
  "/node_modules/": join(root, "clients/js/node_modules"),
  "/js/": join(root, "clients/js"),
};
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".map": "application/json" };

const watchdog = setTimeout(() => {
  console.error("framework_page.mjs: watchdog fired after 80 s");
  process.exit(3);
}, 80_000);

const files = createServer((req, res) => {
  const path = new URL(req.url, "http://x").pathname;
  if (path === "/favicon.ico") return res.writeHead(204).end();
  const prefix = Object.keys(SERVED).find((p) => path.startsWith(p));
  const file = prefix && normalize(join(SERVED[prefix], path.slice(prefix.length)));
  try {
    if (!file || !file.startsWith(SERVED[prefix])) throw new Error("outside");
    const body = readFileSync(file);
    res.writeHead(200, { "Content-Type": TYPES[extname(file)] ?? "application/octet-stream" }).end(body);
  } catch {
    res.writeHead(404).end("not found");
  }
});
await new Promise((resolve) => files.listen(0, "127.0.0.1", resolve));
const appUrl = `http://127.0.0.1:${files.address().port}`;
const wsUrl = httpUrl.replace(/^http/, "ws") + "/stream";

const { context, userDataDir } = await launchChromium({ width: 900, height: 700 });
const result = { pageErrors: [], consoleErrors: [] };
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(20_000);
  page.on("pageerror", (err) => result.pageErrors.push(String(err)));
  page.on("console", (msg) => msg.type() === "error" && result.consoleErrors.push(msg.text()));

  await page.goto(`${appUrl}/pages/${pageName}.html?ws=${encodeURIComponent(wsUrl)}`);
  await page.waitForFunction(() => window.__ready === true);
  const text = (id) => page.locator(`#${id}`).textContent();
  const statusIs = (s) => page.waitForFunction((s) => document.getElementById("status").textContent === s, s);
  const tokensAtLeast = (n) => page.waitForFunction((n) => Number(document.getElementById("tokens").textContent) >= n, n);

  // 1. A long answer, stopped after 10 tokens: "cancelled", and nothing more arrives.
  await page.click("#ask");
  await statusIs("streaming");
  await tokensAtLeast(10);
  await page.click("#stop");
  await statusIs("cancelled");
  const stoppedText = await text("text");
  await page.waitForTimeout(quietMs); // a negative check: the stream must stay silent for a while
  result.stop = {
    tokens: Number(await text("tokens")),
    textLength: stoppedText.length,
    unchangedAfterQuiet: (await text("text")) === stoppedText,
    ttftMs: Number(await text("ttft")),
  };

  // 2. Modify mid-answer: the status goes back to "waiting", then streams the amended answer.
  await page.evaluate(() => (window.__states.length = 0));
  await page.click("#ask");
  await tokensAtLeast(5);
  const before = await page.evaluate(() => window.__states.length);
  await page.click("#modify");
  await page.waitForFunction((before) => window.__states.slice(before).includes("waiting"), before);
  await page.waitForFunction((before) => window.__states.slice(before).includes("streaming"), before);
  await page.click("#stop");
  await statusIs("cancelled");
  result.modify = { states: await page.evaluate(() => [...window.__states]), error: await page.evaluate(() => window.__modifyError ?? null) };

  // 3. A short answer to its end: "done", with the page's and the server's timing.
  await page.click("#short");
  await statusIs("done");
  result.short = {
    tokens: Number(await text("tokens")),
    textLength: (await text("text")).length,
    ttftMs: Number(await text("ttft")),
    serverTtftMs: Number(await text("server-ttft")),
  };

  // 4. An unknown model: the error is a state, with its code.
  await page.click("#bad");
  await statusIs("error");
  result.error = { code: await text("error") };
  result.completed = await page.evaluate(() => window.__completed ?? null);
} catch (err) {
  result.failure = String(err);
  result.status = await context.pages()[0]?.locator("#status").textContent().catch(() => null);
} finally {
  clearTimeout(watchdog);
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
  files.close();
}
console.log(JSON.stringify(result));
