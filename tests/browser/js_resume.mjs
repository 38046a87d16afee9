// Runs clients/js/llmproxy.js in Node through a bridge that the test kills (and
// restarts, or not: then the client resumes through the next URL). Prints
//   {"event": "kill"}            once every stream has `kill_after` tokens
// and, last, one JSON object of what it saw; tests/integration/test_js_resume.py
// judges it.
//
//   node --experimental-websocket tests/browser/js_resume.mjs URLS_JSON SPEC_JSON
//
// SPEC_JSON: {"streams": {"a": prompt, ...}, "seed": n, "max_tokens": n,
//             "kill_after": n | null, "backoff_ms": n}

import { LLMProxyClient } from "../../clients/js/llmproxy.js";
import { runStreams } from "./resume_run.mjs";

const [urlsJson, specJson] = process.argv.slice(2);
const spec = JSON.parse(specJson);
const watchdog = setTimeout(() => {
  console.error("js_resume.mjs: watchdog fired after 60 s");
  process.exit(3);
}, 60_000);

const out = await runStreams(LLMProxyClient, JSON.parse(urlsJson), spec, (event) => console.log(JSON.stringify(event)));
clearTimeout(watchdog);
console.log(JSON.stringify(out));
