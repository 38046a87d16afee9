// A React hook for chat UIs over llmproxy.js. No build step and no dependency of
// its own: it uses the page's React, passed in once, so the page's bundler (or
// import map) decides which React that is.
//
//   import React from "react";                       // or from an import map / CDN
//   import { LLMProxyClient } from "/js/llmproxy.js";
//   import { makeUseLLMStream } from "/js/react.js";
//   const useLLMStream = makeUseLLMStream(React);
//   const client = new LLMProxyClient(`ws://${location.host}/stream`);
//
//   function Chat() {
//     const { text, status, error, start, cancel, modify } = useLLMStream(client);
//     return <>
//       <button onClick={() => start({ model: "demo", messages: [{ role: "user", content: "Hi" }] })}>Ask</button>
//       <button onClick={cancel} disabled={status !== "streaming"}>Stop</button>
//       <p>{text}</p>{error && <p>{error.code}</p>}
//     </>;
//   }
//
// `status`: "idle" | "waiting" (start sent) | "streaming" | "done" | "cancelled" | "error".
// The text survives reconnects (the client resumes underneath); a `modify`
// without keepPartial empties it, and the amended answer streams in.

/**
 * Builds `useLLMStream(client)` on the given React (anything with useState,
 * useRef, useCallback and useEffect: React 16.8+ or Preact's compat).
 */
export function makeUseLLMStream(React) {
  const { useState, useRef, useCallback, useEffect } = React;

  return function useLLMStream(client) {
    const [state, setState] = useState({ text: "", status: "idle", error: null, done: null });
    const handleRef = useRef(null);

    const detach = () => {
      const h = handleRef.current;
      if (h) h.onToken = h.onRestarted = h.onStarted = null;
      handleRef.current = null;
    };

    const start = useCallback(
      (request) => {
        const previous = handleRef.current;
        detach();
        if (previous && !previous.ended) previous.cancel();
        const h = client.stream(request);
        handleRef.current = h;
        setState({ text: "", status: "waiting", error: null, done: null });
        const mine = () => handleRef.current === h;
        h.onStarted = () => mine() && setState((s) => ({ ...s, status: "streaming" }));
        h.onToken = () => mine() && setState((s) => ({ ...s, status: "streaming", text: h.text }));
        h.onRestarted = () => mine() && setState((s) => ({ ...s, status: "waiting", text: h.text }));
        h.done.then(
          (done) =>
            mine() && setState({ text: h.text, status: done.finish_reason === "cancelled" ? "cancelled" : "done", error: null, done }),
          (error) => mine() && setState({ text: h.text, status: "error", error, done: null }),
        );
        return h;
      },
      [client],
    );

    const cancel = useCallback(() => handleRef.current?.cancel(), []);

    const modify = useCallback((change) => {
      const h = handleRef.current;
      if (!h || h.ended) return Promise.reject(new Error("llmproxy: no running stream to modify"));
      return h.modify(change);
    }, []);

    // Leaving the page (unmount) stops the answer: nobody is reading it.
    useEffect(() => () => {
      const h = handleRef.current;
      detach();
      if (h && !h.ended) h.cancel();
    }, [client]);

    return { ...state, start, cancel, modify };
  };
}

/** The hook on `globalThis.React` (a page that loads React with a script tag). */
export function useLLMStream(client) {
  const React = globalThis.React;
  if (!React) throw new Error("llmproxy: no globalThis.React; use makeUseLLMStream(React)");
  return (useLLMStream.impl ??= makeUseLLMStream(React))(client);
}

export default makeUseLLMStream;
