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
// `timing`: { ttftMs, tokens, elapsedMs, tokensPerS, server } (stream-state.js).
// The text survives reconnects (the client resumes underneath); a `modify`
// without keepPartial empties it, and the amended answer streams in.

import { createStreamController, INITIAL_STATE } from "./stream-state.js";

/**
 * Builds `useLLMStream(client)` on the given React (anything with useState,
 * useRef, useCallback and useEffect: React 16.8+ or Preact's compat).
 * The state and its moves are stream-state.js's, shared with the Vue and RxJS adapters.
 */
export function makeUseLLMStream(React) {
  const { useState, useRef, useCallback, useEffect } = React;

  return function useLLMStream(client) {
    const [state, setState] = useState(INITIAL_STATE);
    const controllerRef = useRef(null);
    if (controllerRef.current === null || controllerRef.current.client !== client) {
      controllerRef.current = { client, controller: createStreamController(client, setState) };
    }
    const controller = controllerRef.current.controller;

    const start = useCallback((request) => controller.start(request), [controller]);
    const cancel = useCallback(() => controller.cancel(), [controller]);
    const modify = useCallback((change) => controller.modify(change), [controller]);

    // Leaving the page (unmount) stops the answer: nobody is reading it.
    useEffect(() => () => controller.dispose(), [controller]);

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
