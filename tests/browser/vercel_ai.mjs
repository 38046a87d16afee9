// The Vercel AI SDK (`ai` + `@ai-sdk/openai`) against the bridge: `streamText` with
// `openai(model)` (the Responses API) and `openai.chat(model)` (Chat Completions), text and a
// tool call each (run by tests/integration/test_http_apis.py). Prints one JSON object.
//
//   node tests/browser/vercel_ai.mjs BASE_URL API_KEY

import { createRequire } from "node:module";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../..", import.meta.url));
const require = createRequire(join(root, "clients/js/package.json"));
const { streamText, tool, jsonSchema } = require("ai");
const { createOpenAI } = require("@ai-sdk/openai");

const [baseURL, apiKey] = process.argv.slice(2);
const openai = createOpenAI({ baseURL: baseURL + "/v1", apiKey });
const prompt = "What is the weather?";
const tools = {
  get_weather: tool({
    description: "Weather of a city",
    inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } } }),
  }),
};
const errors = [];
const out = { errors };

async function run(name, model, withTools) {
  const result = streamText({
    model,
    prompt,
    maxRetries: 0,
    ...(withTools ? { tools } : {}),
    onError: ({ error }) => errors.push(`${name}: ${error?.message ?? error}`),
  });
  let text = "";
  let deltas = 0;
  for await (const delta of result.textStream) {
    text += delta;
    deltas += 1;
  }
  const calls = await result.toolCalls;
  out[name] = {
    text,
    deltas,
    finish: await result.finishReason,
    usage: await result.usage,
    calls: calls.map((c) => ({ name: c.toolName, input: c.input, id: c.toolCallId })),
  };
}

await run("responses", openai("oa-text"), false);
await run("responsesTool", openai("oa-tool"), true);
await run("chat", openai.chat("oa-text"), false);
await run("chatTool", openai.chat("oa-tool"), true);
console.log(JSON.stringify(out));
