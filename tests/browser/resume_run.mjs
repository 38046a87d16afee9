// The resume scenario, shared by Node (js_resume.mjs) and Chromium (resume_page.mjs,
// which loads this file in the page): start seeded streams on one client, announce
// when each has `kill_after` tokens (the test then kills the bridge), wait for
// every stream to end, and report texts, duplicates, states and sessions.

export async function runStreams(LLMProxyClient, urls, spec, announce) {
  const out = { states: [], sessions: [], streams: {} };
  const client = new LLMProxyClient(urls, {
    backoff: { baseMs: spec.backoff_ms ?? 50, factor: 1.6, jitter: 0.2, maxMs: 500 },
    maxAttempts: 30,
    onStateChange: (state, previous) => {
      out.states.push([previous, state]);
      (out.stateTimes ??= []).push([state, Math.round(performance.now())]);
      // The test restarts a killed bridge only once the client has seen it gone.
      if (state === "reconnecting" && !out.announcedReconnecting) {
        out.announcedReconnecting = true;
        announce({ event: "reconnecting" });
      }
    },
    onSession: (frame, info) => out.sessions.push({ session_id: frame.session_id, resumed: info.resumed, streams: info.streams ?? null, refused: info.refused ? String(info.refused.message ?? JSON.stringify(info.refused)) : null }),
  });
  await client.connect();
  out.session = { session_id: client.session.session_id, resume_token: client.session.resume_token };
  const handles = {};
  let announced = spec.kill_after == null;
  const counts = {};
  for (const [id, prompt] of Object.entries(spec.streams)) {
    counts[id] = 0;
    handles[id] = client.stream(
      { id, model: "demo", messages: [{ role: "user", content: prompt }], seed: spec.seed, max_tokens: spec.max_tokens },
      {
        onToken: () => {
          counts[id] += 1;
          if (!announced && Object.values(counts).every((n) => n >= spec.kill_after)) {
            announced = true;
            out.killAtLastSeq = Object.fromEntries(Object.entries(handles).map(([k, h]) => [k, h.lastSeq]));
            announce({ event: "kill", session: out.session });
          }
        },
      },
    );
  }
  const settled = await Promise.allSettled(Object.values(handles).map((h) => h.done));
  Object.entries(handles).forEach(([id, h], i) => {
    const s = settled[i];
    out.streams[id] = {
      status: s.status,
      finish: s.status === "fulfilled" ? s.value.finish_reason : null,
      code: s.status === "rejected" ? s.reason.code : null,
      text: h.text,
      lastSeq: h.lastSeq,
      duplicates: h.duplicates,
      tokenFrames: counts[id],
    };
  });
  out.reconnects = client.reconnects;
  out.url = client.url;
  out.finalSession = client.session.session_id;
  await client.close();
  return out;
}
