// Opens the live dashboard in headless Chromium while the test runs a load, waits until it
// has shown live figures (active streams, throughput, histograms, tables), saves a screenshot
// and prints one JSON object of what the page showed.
//
//   node tests/browser/dashboard.mjs HTTP_URL SCREENSHOT_PATH

import { rmSync } from "node:fs";

import { launchChromium } from "./chromium.mjs";

const [httpUrl, screenshot] = process.argv.slice(2);
const watchdog = setTimeout(() => { console.error("dashboard.mjs: watchdog fired"); process.exit(3); }, 45_000);

const { context, userDataDir } = await launchChromium({ width: 1280, height: 860 });
try {
  const page = await context.newPage();
  await page.goto(`${httpUrl}/dashboard.html`);
  const seen = { maxActive: 0, maxTps: 0 };
  // Watch live: record the highest active-stream count and throughput the page showed.
  for (let i = 0; i < 300; i++) {
    const now = await page.evaluate(() => ({
      active: Number(document.getElementById("active").textContent) || 0,
      tps: Number(document.getElementById("tps").textContent.replace(/,/g, "")) || 0,
      ended: Number(document.getElementById("ended").textContent) || 0,
      snapshots: Number(document.body.dataset.snapshots || 0),
    }));
    seen.maxActive = Math.max(seen.maxActive, now.active);
    seen.maxTps = Math.max(seen.maxTps, now.tps);
    if (seen.maxActive > 0 && seen.maxTps > 0 && now.ended >= 8 && now.active > 0 && now.snapshots >= 3) break;
    await page.waitForTimeout(100);
  }
  await page.waitForTimeout(300);
  await page.screenshot({ path: screenshot });
  const shown = await page.evaluate(() => ({
    badge: document.getElementById("conn").textContent,
    snapshots: Number(document.body.dataset.snapshots || 0),
    ended: Number(document.getElementById("ended").textContent) || 0,
    ttftBars: [...document.querySelectorAll("#ttft-hist rect")].filter((r) => Number(r.getAttribute("height")) > 0).length,
    itlBars: [...document.querySelectorAll("#itl-hist rect")].filter((r) => Number(r.getAttribute("height")) > 0).length,
    deployments: [...document.querySelectorAll("#deployments tbody tr")].map((tr) => tr.textContent),
    slowest: [...document.querySelectorAll("#slowest tbody tr td:first-child")].map((td) => td.textContent),
    html: document.documentElement.outerHTML,
  }));
  console.log(JSON.stringify({ ...seen, ...shown }));
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
  clearTimeout(watchdog);
}
