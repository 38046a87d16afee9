// The `openai` npm package against the bridge's Chat Completions API (run by
// tests/integration/test_http_sdks_node.py). Usage: node openai_node.mjs BASE_URL API_KEY
// Prints one JSON object: what each case saw, for the test to judge.

import { createRequire } from "node:module";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../..", import.meta.url));
const require = createRequire(join(root, "clients/js/package.json"));
const OpenAI = require("openai").default ?? require("openai");

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL: baseURL + "/v1", apiKey, maxRetries: 0, timeout: 20000 });
const ask = [{ role: "user", content: "What is the weather?" }];
const tool = {
  type: "function",
  function: { name: "get_weather", description: "Weather of a city", parameters: { type: "object", properties: { city: { type: "string" } } } },
};
const out = {};

// Streaming text with the usage chunk.
{
  const stream = await client.chat.completions.create({ model: "oa-text", messages: ask, stream: true, stream_options: { include_usage: true } });
  let text = "";
  let usage = null;
  let finish = null;
  for await (const chunk of stream) {
    if (chunk.choices.length) {
      text += chunk.choices[0].delta.content ?? "";
      finish = chunk.choices[0].finish_reason ?? finish;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  out.stream = { text, usage, finish };
}

// Not streaming.
{
  const completion = await client.chat.completions.create({ model: "oa-text", messages: ask });
  out.nonStream = { text: completion.choices[0].message.content, usage: completion.usage, finish: completion.choices[0].finish_reason };
}

// A streamed tool call, assembled by the SDK's own helper.
{
  const runner = client.chat.completions.stream({ model: "oa-tool", messages: ask, tools: [tool] });
  const final = await runner.finalChatCompletion();
  const call = final.choices[0].message.tool_calls[0];
  out.toolCall = { name: call.function.name, arguments: call.function.arguments, id: call.id, finish: final.choices[0].finish_reason };
}

// A failure mid-stream: the SDK raises.
{
  let text = "";
  try {
    const stream = await client.chat.completions.create({ model: "oa-midstream", messages: ask, stream: true });
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
    out.midStream = { raised: false, text };
  } catch (err) {
    out.midStream = { raised: true, name: err.constructor.name, message: String(err.message), text };
  }
}

// 429 with retry-after.
{
  try {
    await client.chat.completions.create({ model: "oa-429-node", messages: ask, stream: true });
    out.rateLimited = { raised: false };
  } catch (err) {
    out.rateLimited = { raised: true, name: err.constructor.name, status: err.status, retryAfter: err.headers?.get?.("retry-after") ?? err.headers?.["retry-after"] };
  }
}

console.log(JSON.stringify(out));
