// The JavaScript client in headless Chromium through a bridge the test kills and
// restarts: (1) the resume scenario of resume_run.mjs, running in the page with
// the client the bridge serves; (2) the demo page itself in compare mode, two
// answers side by side, which must go on after the restart; then (3) the demo
// page's "edit while streaming". Prints {"event": "kill"} when the test should
// kill the bridge, and one JSON object of what it saw last.
//
//   node tests/browser/resume_page.mjs HTTP_URL SPEC_JSON PANE_PROMPTS_JSON SCREENSHOT_PATH

import { readFileSync, rmSync } from "node:fs";

import { launchChromium } from "./chromium.mjs";


const [httpUrl, specJson, panesJson, screenshot] = process.argv.slice(2);
const spec = JSON.parse(specJson);
const panePrompts = JSON.parse(panesJson);
const runSource = readFileSync(new URL("./resume_run.mjs", import.meta.url), "utf8");
const PANE_KILL_AFTER = 15;

const watchdog = setTimeout(() => {
  console.error("resume_page.mjs: watchdog fired after 80 s");
  process.exit(3);
}, 80_000);

const { context, userDataDir } = await launchChromium({ width: 1000, height: 900 });

const result = { pageErrors: [], framesSent: [] };
const tokens = (page, selector) => page.evaluate((s) => document.querySelectorAll(s).length, selector);
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(20_000);
  page.on("pageerror", (err) => result.pageErrors.push(String(err)));
  page.on("websocket", (ws) => ws.on("framesent", ({ payload }) => result.framesSent.push(JSON.parse(payload))));

  await page.goto(`${httpUrl}?seed=${spec.seed}`);
  await page.waitForSelector("#conn[data-state=open]");
  await page.evaluate(() => {
    window.__badges = [document.getElementById("conn").dataset.state];
    new MutationObserver(() => {
      const state = document.getElementById("conn").dataset.state;
      if (window.__badges.at(-1) !== state) window.__badges.push(state);
    }).observe(document.getElementById("conn"), { attributes: true });
  });

  // (2) The demo page, compare mode: two prompts, two panes.
  await page.check("#compare");
  await page.fill("#prompt", panePrompts[0]);
  await page.fill("#prompt-b", panePrompts[1]);
  await page.click("#send");

  // (1) The resume scenario with the client served by the bridge, in the page.
  const wsUrl = httpUrl.replace(/^http/, "ws").replace(/\/$/, "") + "/stream";
  await page.evaluate(
    async ({ source, wsUrl, spec }) => {
      const blob = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
      const { runStreams } = await import(blob);
      const { LLMProxyClient } = await import("/js/llmproxy.js");
      window.__kill = false;
      window.__reconnecting = false;
      window.__run = runStreams(LLMProxyClient, [wsUrl], spec, (e) => (window[`__${e.event}`] = true));
    },
    { source: runSource, wsUrl, spec },
  );
  await page.waitForFunction(() => window.__kill === true);
  await page.waitForFunction(
    (n) => [...document.querySelectorAll(".pair .turn.assistant .body")].every((b) => b.querySelectorAll(".tok").length >= n),
    PANE_KILL_AFTER,
  );
  result.paneTokensAtKill = await page.$$eval(".pair .turn.assistant .body", (bs) => bs.map((b) => b.querySelectorAll(".tok").length));
  console.log(JSON.stringify({ event: "kill" }));

  await page.waitForSelector("#conn[data-state=reconnecting]", { timeout: 10_000 });
  await page.waitForFunction(() => window.__reconnecting === true, null, { timeout: 10_000 });
  console.log(JSON.stringify({ event: "reconnecting" })); // both clients saw the bridge gone: restart it
  result.client = await page.evaluate(() => window.__run);
  await page.waitForFunction(() => document.querySelectorAll(".pair .turn.assistant[data-state]").length === 2, null, { timeout: 30_000 });
  await page.waitForSelector("#conn[data-state=open]");
  result.badges = await page.evaluate(() => window.__badges);
  result.panes = await page.$$eval(".pair .turn.assistant .body", (bs) => bs.map((b) => b.textContent));
  result.paneStates = await page.$$eval(".pair .turn.assistant", (ts) => ts.map((t) => t.dataset.state));
  await page.waitForSelector("#send:not([disabled])");
  await page.screenshot({ path: screenshot, fullPage: false }); // the two panes, after the resume

  // (3) Edit while streaming: ask one thing, change it to another mid-answer.
  await page.uncheck("#compare");
  await page.fill("#prompt", "Explain quantum computing");
  await page.click("#send");
  await page.waitForFunction(() => document.querySelectorAll("#transcript > .turn.assistant:last-of-type .tok").length >= 10);
  await page.click("#edit");
  result.editPrefilled = await page.inputValue("#prompt");
  await page.fill("#prompt", "What is a black hole?");
  await page.click("#send"); // "Update"
  await page.waitForSelector("#transcript > .turn.assistant:last-of-type[data-state]", { timeout: 20_000 });
  result.edit = {
    sentModify: result.framesSent.some((f) => f.type === "modify" && f.messages?.at(-1)?.content === "What is a black hole?"),
    prefilled: result.editPrefilled,
    answer: await page.textContent("#transcript > .turn.assistant:last-of-type .body"),
    question: await page.$$eval("#transcript > .turn.user .body", (bs) => bs.at(-1).textContent),
    state: await page.getAttribute("#transcript > .turn.assistant:last-of-type", "data-state"),
  };
  await page.screenshot({ path: screenshot.replace(/\.png$/, "-edit.png"), fullPage: false });
  result.ok = true;
} catch (err) {
  result.ok = false;
  result.failure = String(err?.stack ?? err);
} finally {
  await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  clearTimeout(watchdog);
}
delete result.framesSent;
console.log(JSON.stringify(result));
