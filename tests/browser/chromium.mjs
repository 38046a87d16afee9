// Launches Debian's headless Chromium through playwright-core (from clients/js/node_modules;
// never a downloaded browser) with a fresh profile. Shared by the browser test scripts.
//
//   const { context, userDataDir } = await launchChromium({ width: 900, height: 700 });
//   ... finally: await context.close(); rmSync(userDataDir, { recursive: true, force: true });

import { mkdtempSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../..", import.meta.url));
const { chromium } = createRequire(join(root, "clients/js/package.json"))("playwright-core");

export async function launchChromium(viewport) {
  const userDataDir = mkdtempSync(join(tmpdir(), "llmproxy-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // Without the background-networking flags Chromium keeps dialling hosts this sandbox
    // cannot reach.
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    ],
    viewport,
    timeout: 30_000,
  });
  return { context, userDataDir };
}
