// Drives the demo chat page in headless Chromium: type, send, watch tokens arrive,
// press Stop, watch that nothing more arrives. Prints one JSON object of what it saw;
// tests/integration/test_browser.py judges it.
//
//   node tests/browser/chat_page.mjs HTTP_URL SCREENSHOT_PATH QUIET_MS
//
// playwright-core comes from clients/js/node_modules (`make install-test`); the browser
// is Debian's /usr/bin/chromium (CHROMIUM overrides), never a downloaded one.

import { rmSync } from "node:fs";

import { launchChromium } from "./chromium.mjs";


const [httpUrl, screenshot, quietArg] = process.argv.slice(2);
const quietMs = Number(quietArg ?? 600);
const PROMPT = "Explain quantum computing";
const STOP_AFTER_TOKENS = 30;

// A hard bound on the whole run, whatever hangs: the test reads the exit code.
const watchdog = setTimeout(() => {
  console.error("chat_page.mjs: watchdog fired after 60 s");
  process.exit(3);
}, 60_000);

const { context, userDataDir } = await launchChromium({ width: 900, height: 700 });

const result = { pageErrors: [], consoleErrors: [] };
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(15_000);
  page.on("pageerror", (err) => result.pageErrors.push(String(err)));
  page.on("console", (msg) => msg.type() === "error" && result.consoleErrors.push(msg.text()));
  // What crossed the socket, as the server sent it and the page sent it.
  result.framesReceived = [];
  result.framesSent = [];
  page.on("websocket", (ws) => {
    ws.on("framereceived", ({ payload }) => result.framesReceived.push(JSON.parse(payload)));
    ws.on("framesent", ({ payload }) => result.framesSent.push(JSON.parse(payload)));
  });

  await page.goto(httpUrl);
  await page.waitForSelector("#conn[data-state=open]");
  // Every change to the answer is logged with its time: tokens must come one by one.
  await page.evaluate(() => {
    window.__updates = [];
    new MutationObserver(() => {
      const answer = document.querySelector(".turn.assistant:last-of-type .body");
      const count = answer ? answer.querySelectorAll(".tok").length : 0;
      const last = window.__updates.at(-1);
      if (!last || last.count !== count) window.__updates.push({ t: performance.now(), count });
    }).observe(document.getElementById("transcript"), { childList: true, subtree: true });
  });

  await page.fill("#prompt", PROMPT);
  await page.click("#send");
  result.submittedAt = await page.evaluate(() => performance.now());
  await page.waitForFunction((n) => document.querySelectorAll(".turn.assistant .tok").length >= n, STOP_AFTER_TOKENS);
  result.stopEnabled = await page.isEnabled("#stop");
  result.sendDisabledWhileStreaming = await page.isDisabled("#send");

  await page.click("#stop");
  result.tokensAtStop = await page.evaluate(() => document.querySelectorAll(".turn.assistant .tok").length);
  result.stoppedAt = await page.evaluate(() => performance.now());
  await page.waitForSelector("#status[data-state=cancelled]", { timeout: 5_000 });
  result.cancelledAt = await page.evaluate(() => performance.now());
  result.tokensAtCancelled = await page.evaluate(() => document.querySelectorAll(".turn.assistant .tok").length);

  await page.waitForTimeout(quietMs); // several token intervals: nothing may arrive now
  result.tokensAfterQuiet = await page.evaluate(() => document.querySelectorAll(".turn.assistant .tok").length);
  result.updates = await page.evaluate(() => window.__updates);
  result.status = await page.textContent("#status");
  result.finish = await page.textContent("#finish");
  result.serverTiming = await page.textContent("#server-timing");
  result.answer = await page.textContent(".turn.assistant .body");
  result.latencyTitles = await page.$$eval(".turn.assistant .tok", (els) => els.slice(0, 5).map((e) => e.title));
  result.stopEnabledAfter = await page.isEnabled("#stop");
  result.sendEnabledAfter = await page.isEnabled("#send");

  await page.check("#show-latency"); // per-token latency labels, for the screenshot
  await page.screenshot({ path: screenshot, fullPage: true });
  result.ok = true;
} catch (err) {
  result.ok = false;
  result.failure = String(err?.stack ?? err);
} finally {
  await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  clearTimeout(watchdog);
}
console.log(JSON.stringify(result));
