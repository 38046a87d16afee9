// llmproxy JavaScript client: one WebSocket, any number of token streams on it.
//
// Theory of operation. An `LLMProxyClient` owns one WebSocket to the bridge
// (docs/protocol.md). Each `stream()` call picks a stream id, sends a `start`
// frame and returns a `StreamHandle`; every server frame carrying that id is
// routed to the handle, which keeps the last `seq` it saw, the token texts, and
// a `done` promise. A handle ends exactly once: with a `done` frame (the promise
// resolves to it) or with an `error` frame or a lost connection (the promise
// rejects with an `LLMProxyError`). A stream that failed is never reported as
// finished.
//
// Both the client and each handle are small state machines: states are strings,
// the legal moves are the tables below, and anything else is a bug that throws.
// Reconnect and resume (issue 5) will add a `reconnecting` client state in which
// live handles are kept, not failed: `_socketClosed()` is the one place that
// decides, and each handle already knows the last `seq` it received.
//
// No dependencies: browsers use their WebSocket; Node 20 needs
// `--experimental-websocket` (Node 22 has it by default) or any constructor with
// the browser's API passed as the `WebSocket` option.

/** Connection states and the moves between them. */
const CLIENT_MOVES = {
  idle: ["connecting", "closed"],
  connecting: ["open", "closing", "closed"],
  open: ["closing", "closed"],
  closing: ["closed"],
  closed: [],
};

/** Stream states: pending (start sent), streaming (started seen), then an end. */
const STREAM_MOVES = {
  pending: ["streaming", "done", "failed"],
  streaming: ["done", "failed"],
  done: [],
  failed: [],
};

function move(table, from, to, what) {
  if (!table[from].includes(to)) {
    throw new Error(`llmproxy: illegal ${what} state change ${from} -> ${to}`);
  }
  return to;
}

/**
 * An error frame from the server, or a failure of the connection under a stream.
 * `code` is one of the protocol's error codes (`unknown_model`, `rate_limited`,
 * ...) or a client-side one: `connection_failed`, `connection_lost`,
 * `client_closed`, `timeout`.
 */
export class LLMProxyError extends Error {
  constructor(code, message, { retryable = false, retryAfterMs = null, streamId = null, frame = null } = {}) {
    super(`${code}: ${message}`);
    this.name = "LLMProxyError";
    this.code = code;
    this.detail = message;
    this.retryable = retryable;
    this.retryAfterMs = retryAfterMs;
    this.streamId = streamId;
    this.frame = frame;
  }

  static fromFrame(frame) {
    return new LLMProxyError(frame.code, frame.message, {
      retryable: Boolean(frame.retryable),
      retryAfterMs: frame.retry_after_ms ?? null,
      streamId: frame.id || null,
      frame,
    });
  }
}

/** Generation parameters `stream()` passes through to the start frame. */
const START_FIELDS = ["temperature", "top_p", "max_tokens", "stop", "seed", "tools", "tool_choice"];

/** One stream: iterate it for token texts, or set the callbacks. */
export class StreamHandle {
  constructor(client, id, callbacks) {
    this.id = id;
    this.state = "pending";
    /** The `started` frame, once it arrived. */
    this.started = null;
    /** The last sequence number received (what a resume will send). */
    this.lastSeq = 0;
    this.onStarted = callbacks.onStarted ?? null;
    this.onToken = callbacks.onToken ?? null;
    this.onFrame = callbacks.onFrame ?? null;
    this.onDone = callbacks.onDone ?? null;
    this.onError = callbacks.onError ?? null;
    this._client = client;
    this._parts = []; // token texts in order; iterators index into it
    this._wake = null; // resolves pending iterators when something arrives
    this._error = null;
    this.done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // Nobody may await `done` (a caller that only iterates): keep a failed
    // stream from becoming an unhandled rejection. Awaiting it still throws.
    this.done.catch(() => {});
  }

  /** The text received so far. */
  get text() {
    return this._parts.join("");
  }

  /** True once the stream has ended (done or failed). */
  get ended() {
    return this.state === "done" || this.state === "failed";
  }

  /**
   * Asks the server to stop the stream; the provider request is closed and
   * the stream ends with `done`, `finish_reason` "cancelled". Idempotent.
   * Returns the `done` promise.
   */
  cancel() {
    if (!this.ended && !this._cancelSent) {
      this._cancelSent = true;
      this._client._send({ type: "cancel", id: this.id });
    }
    return this.done;
  }

  /**
   * Token texts as they arrive. Ends after `done`; throws the stream's
   * `LLMProxyError` if it failed. Leaving the loop early cancels the stream.
   */
  async *[Symbol.asyncIterator]() {
    let next = 0;
    let finished = false;
    try {
      for (;;) {
        while (next < this._parts.length) yield this._parts[next++];
        if (this.state === "done") {
          finished = true;
          return;
        }
        if (this.state === "failed") {
          finished = true;
          throw this._error;
        }
        if (this._wake === null) {
          this._wake = new Promise((resolve) => (this._wakeUp = resolve));
        }
        await this._wake;
      }
    } finally {
      if (!finished) this.cancel();
    }
  }

  /** Called by the client for every frame with this stream's id. */
  _receive(frame) {
    if (frame.seq > 0) {
      if (frame.seq <= this.lastSeq) return; // already seen (a replay after resume)
      this.lastSeq = frame.seq;
    }
    switch (frame.type) {
      case "started":
        this.state = move(STREAM_MOVES, this.state, "streaming", "stream");
        this.started = frame;
        call(this.onStarted, frame);
        break;
      case "token":
        this._parts.push(frame.token);
        call(this.onToken, frame.token, frame);
        break;
      case "done":
        this._end("done", frame, null);
        return;
      case "error":
        this._end("failed", frame, LLMProxyError.fromFrame(frame));
        return;
    }
    call(this.onFrame, frame);
    this._notify();
  }

  /** Ends the stream once: resolves or rejects `done`, wakes iterators. */
  _end(state, frame, error) {
    if (this.ended) return;
    this.state = move(STREAM_MOVES, this.state, state, "stream");
    this._client._forget(this);
    if (error) {
      this._error = error;
      this._reject(error);
      if (frame) call(this.onFrame, frame); // null when the connection, not the server, ended it
      call(this.onError, error);
    } else {
      this._resolve(frame);
      call(this.onFrame, frame);
      call(this.onDone, frame);
    }
    this._notify();
  }

  _fail(error) {
    this._end("failed", error.frame, error);
  }

  _notify() {
    if (this._wake !== null) {
      this._wake = null;
      this._wakeUp();
    }
  }
}

/** Calls a user callback; its exception must not break the frame loop. */
function call(fn, ...args) {
  if (typeof fn !== "function") return;
  try {
    fn(...args);
  } catch (err) {
    queueMicrotask(() => {
      throw err; // reported as uncaught, like an exception in an event listener
    });
  }
}

const now = () => globalThis.performance?.now() ?? Date.now();

export class LLMProxyClient {
  /**
   * @param url   ws:// or wss:// URL of the bridge's `/stream`
   * @param options.WebSocket        constructor (default `globalThis.WebSocket`)
   * @param options.connectTimeoutMs give up connecting after this (default 10000)
   * @param options.idPrefix         prefix of generated stream ids (default "s")
   * @param options.onStateChange    (state, previous) => void
   * @param options.onError          (LLMProxyError) => void, for errors about no live stream
   */
  constructor(url, options = {}) {
    this.url = url;
    this.state = "idle";
    this.onStateChange = options.onStateChange ?? null;
    this.onError = options.onError ?? null;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError(
        "llmproxy: no WebSocket constructor; pass {WebSocket} (Node 20: run with --experimental-websocket)",
      );
    }
    this._connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this._idPrefix = options.idPrefix ?? "s";
    this._nextId = 1;
    this._nextNonce = 1;
    this._ws = null;
    this._connecting = null;
    this._outbox = []; // frames written before the socket opened
    this._streams = new Map(); // id -> live StreamHandle
    this._pings = new Map(); // nonce -> {resolve, reject, sentAt, timer}
    this._lastConnectionError = null;
    this._closeWaiters = []; // close() promises, resolved once the socket is gone
  }

  /**
   * Opens the WebSocket. Resolves once open (at once if already open); rejects
   * with `LLMProxyError` `connection_failed` or `timeout`. Safe to call again.
   */
  connect() {
    if (this.state === "open") return Promise.resolve();
    if (this._connecting) return this._connecting;
    if (this.state !== "idle") {
      return Promise.reject(new LLMProxyError("client_closed", "this client was closed; make a new one"));
    }
    this._setState("connecting");
    this._connecting = new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new this._WebSocket(this.url);
      } catch (err) {
        this._connecting = null;
        const error = new LLMProxyError("connection_failed", String(err?.message ?? err));
        this._socketClosed(error);
        reject(error);
        return;
      }
      this._ws = ws;
      const timer = setTimeout(() => {
        this._connecting = null;
        const error = new LLMProxyError("timeout", `no connection to ${this.url} within ${this._connectTimeoutMs} ms`, {
          retryable: true,
        });
        reject(error);
        this._socketClosed(error);
        ws.close();
      }, this._connectTimeoutMs);
      ws.onopen = () => {
        clearTimeout(timer);
        this._connecting = null;
        if (this.state !== "connecting") return; // closed meanwhile
        this._setState("open");
        for (const data of this._outbox.splice(0)) ws.send(data);
        resolve();
      };
      ws.onmessage = (event) => this._receive(event.data);
      ws.onerror = () => {}; // always followed by close, which carries the code
      ws.onclose = (event) => {
        clearTimeout(timer);
        const wasConnecting = this._connecting !== null;
        this._connecting = null;
        const error = wasConnecting
          ? new LLMProxyError("connection_failed", `cannot connect to ${this.url} (close code ${event.code})`, {
              retryable: true,
            })
          : this._closeError(event);
        if (wasConnecting) reject(error);
        this._socketClosed(error);
      };
    });
    return this._connecting;
  }

  /**
   * Starts a stream and returns its handle at once. Connects first if needed;
   * frames wait in order until the socket is open.
   * @param request  {model, messages, max_tokens, temperature, top_p, stop, seed, tools, tool_choice, id}
   * @param callbacks {onStarted, onToken, onFrame, onDone, onError}
   * Throws `LLMProxyError` `duplicate_stream_id` if `request.id` names a live stream.
   */
  stream(request, callbacks = {}) {
    const id = request.id ?? `${this._idPrefix}${this._nextId++}`;
    if (this._streams.has(id)) {
      throw new LLMProxyError("duplicate_stream_id", `stream id ${JSON.stringify(id)} is live on this client`);
    }
    const frame = { type: "start", id, model: request.model, messages: request.messages };
    for (const key of START_FIELDS) if (request[key] !== undefined) frame[key] = request[key];
    const handle = new StreamHandle(this, id, callbacks);
    if (this.state === "closing" || this.state === "closed") {
      handle._fail(new LLMProxyError("client_closed", "this client was closed; make a new one", { streamId: id }));
      return handle;
    }
    this._streams.set(id, handle);
    this._send(frame);
    if (this.state === "idle") this.connect().catch(() => {}); // the handle gets the failure
    return handle;
  }

  /**
   * Application-level ping. Resolves to the round trip in milliseconds;
   * rejects with `LLMProxyError` `timeout` or a connection error.
   */
  ping({ timeoutMs = 10000 } = {}) {
    const nonce = this._nextNonce++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pings.delete(nonce);
        reject(new LLMProxyError("timeout", `no pong within ${timeoutMs} ms`, { retryable: true }));
      }, timeoutMs);
      this._pings.set(nonce, { resolve, reject, timer, sentAt: now() });
      this._send({ type: "ping", nonce });
      if (this.state === "idle") this.connect().catch(() => {});
    });
  }

  /** Closes the socket; live streams fail with `client_closed` (the server cancels them). */
  close(code = 1000, reason = "") {
    if (this.state === "closed") return Promise.resolve();
    const error = new LLMProxyError("client_closed", "the client was closed");
    if (this._ws === null) {
      this._socketClosed(error);
      return Promise.resolve();
    }
    const closed = new Promise((resolve) => this._closeWaiters.push(resolve));
    if (this.state !== "closing") this._setState("closing");
    this._failAll(error);
    this._ws.close(code, reason);
    return closed;
  }

  // -- internals ----------------------------------------------------------------

  _send(frame) {
    const data = JSON.stringify(frame);
    if (this.state === "open") this._ws.send(data);
    else this._outbox.push(data);
  }

  _receive(data) {
    if (typeof data !== "string") data = new TextDecoder().decode(data);
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      call(this.onError, new LLMProxyError("protocol_error", "the server sent a frame that is not JSON"));
      return;
    }
    if (frame.type === "pong") {
      const waiter = this._pings.get(frame.nonce);
      if (waiter) {
        this._pings.delete(frame.nonce);
        clearTimeout(waiter.timer);
        waiter.resolve(now() - waiter.sentAt);
      }
      return;
    }
    const handle = frame.id ? this._streams.get(frame.id) : undefined;
    if (frame.type === "error" && frame.seq === 0) {
      // A rejected frame. If it names a stream that has not started, it was that
      // stream's start: the stream ends. A rejected cancel of a stream that is
      // just finishing (unknown_stream) names a started or ended stream: ignored.
      if (handle && handle.state === "pending") handle._receive(frame);
      else if (!handle && !frame.id) {
        this._lastConnectionError = LLMProxyError.fromFrame(frame);
        call(this.onError, this._lastConnectionError);
      }
      return;
    }
    if (handle) handle._receive(frame);
  }

  _forget(handle) {
    if (this._streams.get(handle.id) === handle) this._streams.delete(handle.id);
  }

  _failAll(error) {
    for (const handle of [...this._streams.values()]) {
      handle._fail(new LLMProxyError(error.code, error.detail, { retryable: error.retryable, streamId: handle.id }));
    }
    for (const { reject, timer } of this._pings.values()) {
      clearTimeout(timer);
      reject(error);
    }
    this._pings.clear();
    this._outbox.length = 0;
  }

  _closeError(event) {
    const last = this._lastConnectionError; // e.g. `unavailable` sent just before a 1013 close
    if (last) return new LLMProxyError(last.code, last.detail, { retryable: last.retryable });
    return new LLMProxyError("connection_lost", `the connection closed (code ${event.code})`, {
      retryable: event.code !== 1008 && event.code !== 1009,
    });
  }

  /** The socket is gone. Today every live stream fails; with resume, they will wait. */
  _socketClosed(error) {
    if (this._ws) {
      this._ws.onopen = this._ws.onmessage = this._ws.onclose = this._ws.onerror = null;
    }
    this._ws = null;
    this._failAll(error);
    if (this.state !== "closed") this._setState("closed");
    for (const resolve of this._closeWaiters.splice(0)) resolve();
  }

  _setState(next) {
    const previous = this.state;
    this.state = move(CLIENT_MOVES, previous, next, "connection");
    call(this.onStateChange, next, previous);
  }
}

export default LLMProxyClient;
