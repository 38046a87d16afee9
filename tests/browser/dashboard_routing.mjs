// Opens the live dashboard in headless Chromium after the test made a deployment fail, waits
// until the deployments table shows WANTED with a failed attempt, saves a screenshot and prints
// one JSON object: the table's header and rows, cell by cell.
//
//   node tests/browser/dashboard_routing.mjs HTTP_URL SCREENSHOT_PATH WANTED

import { rmSync } from "node:fs";

import { launchChromium } from "./chromium.mjs";

const [httpUrl, screenshot, wanted] = process.argv.slice(2);
const watchdog = setTimeout(() => { console.error("dashboard_routing.mjs: watchdog fired"); process.exit(3); }, 45_000);

const { context, userDataDir } = await launchChromium({ width: 1400, height: 860 });
try {
  const page = await context.newPage();
  await page.goto(`${httpUrl}/dashboard.html`);
  const table = () => page.evaluate(() => ({
    header: [...document.querySelectorAll("#deployments thead th")].map((th) => th.textContent),
    rows: [...document.querySelectorAll("#deployments tbody tr")].map((tr) => [...tr.cells].map((td) => ({ text: td.textContent, cls: td.className }))),
  }));
  let shown = await table();
  for (let i = 0; i < 300; i++) {
    const row = shown.rows.find((r) => r[0]?.text === wanted);
    const failed = row ? Number(row[shown.header.indexOf("failed attempts")]?.text) : 0;
    if (failed > 0) break;
    await page.waitForTimeout(100);
    shown = await table();
  }
  await page.screenshot({ path: screenshot });
  console.log(JSON.stringify(shown));
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
  clearTimeout(watchdog);
}
