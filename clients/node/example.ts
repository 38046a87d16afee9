// A typed backend use of the client (typechecked by `npm run typecheck`, a test of make test):
// node --experimental-strip-types is not needed to use the client; this file only proves the types.
import { LLMProxyClient, LLMProxyError, type StreamDone } from "./index.js";

export async function answer(target: string, question: string): Promise<string> {
  const client = new LLMProxyClient(target, { backoff: { baseMs: 200 } });
  const stream = client.stream({ model: "demo", messages: [{ role: "user", content: question }], maxTokens: 100 });
  let text = "";
  for await (const frame of stream.frames()) {
    if (frame.kind === "token" && frame.token) text += frame.token.text;
    if (frame.kind === "started" && frame.started) console.log("served by", frame.started.deployment);
  }
  try {
    const done: StreamDone = await stream.done;
    const ttftUs: number | undefined = done.timing?.ttft_us;
    const reason: string | undefined = done.finish_reason;
    console.log(reason, ttftUs);
  } catch (err) {
    if (err instanceof LLMProxyError) console.log(err.code, err.retryable);
  }
  client.close();
  return text;
}
