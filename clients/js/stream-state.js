// The state of one chat answer, shared by the framework adapters (vue.js, rxjs.js): what a UI
// shows while a stream runs, independent of any framework.
//
// Theory of operation. A controller holds at most one current stream of an LLMProxyClient.
// `start(request)` cancels the previous one if it still runs and starts another; the handle's
// callbacks move the state through the table below, and every change is handed to `onChange`
// as a new frozen object (so frameworks that compare by identity see it). Callbacks of a stream
// that is no longer current are ignored.
//
//   state: { text, status, timing, error, done }
//   status: "idle" | "waiting" (start sent, or restarted by a modify) | "streaming" | "done" |
//           "cancelled" | "error"
//   timing: { ttftMs, tokens, elapsedMs, tokensPerS } measured in the page (ttftMs: from start()
//           to the first token), and `server`: the done frame's timing once it arrived.

/** Legal status moves; anything else is a bug and throws. */
export const STATUS_MOVES = {
  idle: ["waiting"],
  waiting: ["streaming", "waiting", "done", "cancelled", "error"],
  streaming: ["streaming", "waiting", "done", "cancelled", "error"],
  done: ["waiting"],
  cancelled: ["waiting"],
  error: ["waiting"],
};

export const INITIAL_STATE = Object.freeze({
  text: "",
  status: "idle",
  timing: Object.freeze({ ttftMs: null, tokens: 0, elapsedMs: 0, tokensPerS: 0, server: null }),
  error: null,
  done: null,
});

const now = () => (globalThis.performance ? performance.now() : Date.now());

/**
 * @param client an LLMProxyClient (clients/js/llmproxy.js)
 * @param onChange called with every new state
 */
export function createStreamController(client, onChange) {
  let state = INITIAL_STATE;
  let handle = null;
  let startedAt = 0;
  let firstAt = null;

  const set = (status, changes) => {
    if (!STATUS_MOVES[state.status].includes(status)) {
      throw new Error(`llmproxy: illegal answer status change ${state.status} -> ${status}`);
    }
    state = Object.freeze({ ...state, ...changes, status });
    onChange(state);
  };

  const timing = (tokens, server = null) => {
    const t = now();
    const rate = firstAt !== null && tokens > 1 && t > firstAt ? ((tokens - 1) * 1000) / (t - firstAt) : 0;
    return Object.freeze({ ttftMs: firstAt === null ? null : firstAt - startedAt, tokens, elapsedMs: t - startedAt, tokensPerS: rate, server });
  };

  const detach = () => {
    if (handle) handle.onStarted = handle.onToken = handle.onRestarted = null;
    handle = null;
  };

  return {
    get state() {
      return state;
    },

    /** Starts a stream (cancelling the previous one if it still runs); returns its handle. */
    start(request) {
      const previous = handle;
      detach();
      if (previous && !previous.ended) previous.cancel();
      const h = client.stream(request);
      handle = h;
      startedAt = now();
      firstAt = null;
      let tokens = 0;
      const mine = () => handle === h;
      set("waiting", { text: "", timing: timing(0), error: null, done: null });
      h.onStarted = () => mine() && set("streaming", {});
      h.onToken = () => {
        if (!mine()) return;
        tokens += 1;
        if (firstAt === null) firstAt = now();
        set("streaming", { text: h.text, timing: timing(tokens) });
      };
      h.onRestarted = () => mine() && set("waiting", { text: h.text });
      h.done.then(
        (done) => {
          if (!mine()) return;
          set(done.finish_reason === "cancelled" ? "cancelled" : "done", { text: h.text, timing: timing(tokens, done.timing ?? null), done });
          detach();
        },
        (error) => {
          if (!mine()) return;
          set("error", { text: h.text, timing: timing(tokens), error });
          detach();
        },
      );
      return h;
    },

    /** Stops the running answer; the state then turns "cancelled". */
    cancel() {
      if (handle && !handle.ended) return handle.cancel();
      return undefined;
    },

    /** Amends the running answer (see StreamHandle.modify). */
    modify(change) {
      if (!handle || handle.ended) return Promise.reject(new Error("llmproxy: no running stream to modify"));
      return handle.modify(change);
    },

    /** Cancels a running answer and stops reporting (a component going away). */
    dispose() {
      const h = handle;
      detach();
      if (h && !h.ended) h.cancel();
    },
  };
}
