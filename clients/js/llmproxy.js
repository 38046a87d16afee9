// llmproxy JavaScript client: one WebSocket, any number of token streams on it,
// and streams that outlive the WebSocket.
//
// Theory of operation. An `LLMProxyClient` owns one WebSocket to a bridge
// (docs/protocol.md). Each `stream()` call picks a stream id, sends a `start`
// frame and returns a `StreamHandle`; every server frame carrying that id is
// routed to the handle, which keeps the last `seq` it saw, the token texts, and
// a `done` promise. A handle ends exactly once: with a `done` frame (the promise
// resolves to it) or with an `error` frame or a lost session (the promise
// rejects with an `LLMProxyError`). A stream that failed is never reported as
// finished.
//
// Sessions and resume. Every connection begins with a `session` frame (id,
// resume token, grace period). When the socket drops for any reason other than
// our own `close()`, the client enters `reconnecting`: live handles are kept,
// and it reconnects with exponential backoff and jitter (1 s x 1.6, +/-20 %,
// capped), trying the next URL of its list each time, so a session can resume
// through another bridge. The first frame on the new socket is `resume` with the
// last `seq` of every unfinished stream; the server answers `resumed` and replays
// exactly what was missed. Each handle drops a frame at or below its last `seq`,
// so nothing is shown twice. A stream the server never heard of (`known: false`:
// its start was lost with the socket) is started again. A refused resume
// (`expired`: the grace period passed) fails the unfinished streams with code
// `expired`, and the client goes on with the new connection's fresh session.
// `close()` closes with code 1000, which ends the session on the server.
//
// Both the client and each handle are small state machines: states are strings,
// the legal moves are the tables below, and anything else is a bug that throws.
// A socket goes through phases of its own (`session` -> `resuming` -> `ready`):
// frames the application sends wait in the outbox until the phase is `ready`.
//
// Where WebSockets cannot open (corporate proxies, old load balancers) the client
// speaks the same protocol over Server-Sent Events (`SseSocket`, below: an
// EventSource for the server's frames, a POST per client frame, on the bridge's
// HTTP port given as `sseUrl`): by itself when a WebSocket cannot open
// (`transport: "auto"`, the default, with `sseUrl` set), or always
// (`transport: "sse"`). Same API, same session, same resume.
//
// No dependencies: browsers use their WebSocket; Node 20 needs
// `--experimental-websocket` (Node 22 has it by default) or any constructor with
// the browser's API passed as the `WebSocket` option.

/** Connection states and the moves between them. */
const CLIENT_MOVES = {
  idle: ["connecting", "closed"],
  connecting: ["open", "closing", "closed"],
  open: ["reconnecting", "closing", "closed"],
  reconnecting: ["open", "closing", "closed"],
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
 * `expired`, ...) or a client-side one: `connection_failed`, `connection_lost`,
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
const START_FIELDS = ["temperature", "top_p", "max_tokens", "stop", "seed", "tools", "tool_choice", "conversation", "cache"];

/** One stream: iterate it for token texts, or set the callbacks. */
export class StreamHandle {
  constructor(client, id, startFrame, callbacks) {
    this.id = id;
    this.state = "pending";
    /** The `started` frame, once it arrived. */
    this.started = null;
    /** The last sequence number received (what a resume sends). */
    this.lastSeq = 0;
    /** Frames dropped because they were already delivered (a replay overlap); stays 0 in practice. */
    this.duplicates = 0;
    /** How many times `modify` restarted this stream. */
    this.restarts = 0;
    this.onStarted = callbacks.onStarted ?? null;
    this.onToken = callbacks.onToken ?? null;
    this.onRestarted = callbacks.onRestarted ?? null;
    this.onFrame = callbacks.onFrame ?? null;
    this.onDone = callbacks.onDone ?? null;
    this.onError = callbacks.onError ?? null;
    this._client = client;
    this._startFrame = startFrame; // resent if the server never received it
    this._startSent = false; // written to a socket (may still have been lost with it)
    this._cancelSent = false;
    this._parts = []; // every token text in order; iterators index into it
    this._textFrom = 0; // `text` starts here: moved forward by a restart without keep_partial
    this._restartWaiters = [];
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

  /** The text of the answer so far (since the last restart that dropped the partial answer). */
  get text() {
    return this._parts.slice(this._textFrom).join("");
  }

  /** True once the stream has ended (done or failed). */
  get ended() {
    return this.state === "done" || this.state === "failed";
  }

  /**
   * Asks the server to stop the stream; the provider request is closed and
   * the stream ends with `done`, `finish_reason` "cancelled". Idempotent; a
   * cancel lost with a dropped socket is sent again after the resume.
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
   * Amends the running stream: the server stops the current generation at once
   * and starts the amended one under the same id (a `restarted` frame marks the
   * point; sequence numbers continue).
   * @param change.messages    replace the stream's messages (optional)
   * @param change.append      messages added after them, e.g. a new instruction (optional)
   * @param change.keepPartial keep the partial answer (default false: `text` starts afresh)
   * Resolves to the `restarted` frame; rejects with `LLMProxyError` if the stream
   * ended first (or had already ended: code `unknown_stream`).
   */
  modify({ messages, append, keepPartial = false } = {}) {
    if (this.ended) {
      return Promise.reject(new LLMProxyError("unknown_stream", `stream ${this.id} has ended`, { streamId: this.id }));
    }
    const frame = { type: "modify", id: this.id, keep_partial: Boolean(keepPartial) };
    if (messages?.length) frame.messages = messages;
    if (append?.length) frame.append = append;
    const restarted = new Promise((resolve, reject) => this._restartWaiters.push({ resolve, reject }));
    restarted.catch(() => {});
    this._client._send(frame);
    return restarted;
  }

  /**
   * Token texts as they arrive. Ends after `done`; throws the stream's
   * `LLMProxyError` if it failed. Leaving the loop early cancels the stream.
   * A restart does not take back texts already yielded (see `onRestarted`).
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
      if (frame.seq <= this.lastSeq) {
        this.duplicates += 1; // already seen (a replay after resume)
        return;
      }
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
      case "restarted":
        this.restarts += 1;
        if (!frame.keep_partial) this._textFrom = this._parts.length;
        for (const { resolve } of this._restartWaiters.splice(0)) resolve(frame);
        call(this.onRestarted, frame);
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
    const unanswered = this._restartWaiters.splice(0);
    if (error) {
      this._error = error;
      this._reject(error);
      for (const { reject } of unanswered) reject(error);
      if (frame) call(this.onFrame, frame); // null when the connection, not the server, ended it
      call(this.onError, error);
    } else {
      const ended = new LLMProxyError("unknown_stream", `stream ${this.id} ended before the modify`, { streamId: this.id });
      for (const { reject } of unanswered) reject(ended);
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

/** Reconnect delays: base x factor^attempt, capped, then +/- jitter. */
export const DEFAULT_BACKOFF = Object.freeze({ baseMs: 1000, factor: 1.6, jitter: 0.2, maxMs: 15000 });

export function backoffDelayMs(attempt, backoff = DEFAULT_BACKOFF, random = Math.random) {
  const raw = Math.min(backoff.maxMs, backoff.baseMs * backoff.factor ** attempt);
  return raw * (1 + backoff.jitter * (2 * random() - 1));
}

/**
 * Our protocol over Server-Sent Events (bridge/sse_transport.py, docs/http-apis.md), behind a
 * WebSocket's interface (onopen, onmessage, onerror, onclose, send, close), so the client runs
 * unchanged over it. `POST {base}/sse` opens a session; an EventSource reads its frames, each
 * event's id being the frame's position, so the browser's own reconnect resumes the event
 * stream through `Last-Event-ID` with nothing lost or repeated; each `send()` is a POST, one at
 * a time, in order. `close(1000)` ends the session; any other code only detaches it (a drop).
 * The server's end of the session arrives as an `event: close` with the WebSocket close code.
 */
export class SseSocket {
  constructor(baseUrl, { EventSource = globalThis.EventSource, fetch = globalThis.fetch.bind(globalThis) } = {}) {
    this.url = baseUrl.replace(/\/+$/, "");
    this.readyState = 0; // CONNECTING, OPEN 1, CLOSING 2, CLOSED 3, as a WebSocket's
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    /** How many times the event stream was opened (1 + reconnects of ours). */
    this.eventStreams = 0;
    this._EventSource = EventSource;
    this._fetch = fetch;
    this._sid = null;
    this._es = null;
    this._lastId = 0;
    this._posting = Promise.resolve();
    this._begin();
  }

  async _begin() {
    try {
      const response = await this._fetch(`${this.url}/sse`, { method: "POST" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      this._sid = (await response.json()).session;
    } catch {
      this._finish(1006, true);
      return;
    }
    if (this.readyState >= 2) {
      this._delete(false); // closed while opening
      return;
    }
    this._listen();
  }

  _listen() {
    const query = this._lastId ? `?last_event_id=${this._lastId}` : "";
    const es = new this._EventSource(`${this.url}/sse/${encodeURIComponent(this._sid)}${query}`);
    this._es = es;
    this.eventStreams += 1;
    es.onopen = () => {
      if (this.readyState === 0) {
        this.readyState = 1;
        this.onopen?.({});
      }
    };
    es.onmessage = (event) => {
      const id = Number(event.lastEventId);
      if (id && id <= this._lastId) return; // already delivered
      if (id) this._lastId = id;
      this.onmessage?.({ data: event.data });
    };
    es.addEventListener("close", (event) => {
      let code = 1006;
      try {
        code = JSON.parse(event.data).code;
      } catch {}
      this._finish(code, false);
    });
    // While the browser reconnects by itself (readyState CONNECTING) there is nothing to do;
    // CLOSED means it gave up (an HTTP error): the session is gone from this bridge.
    es.onerror = () => {
      if (this._es === es && es.readyState === 2) this._finish(1006, true);
    };
  }

  send(data) {
    if (this.readyState !== 1) throw new Error("llmproxy: the SSE session is not open");
    const url = `${this.url}/sse/${encodeURIComponent(this._sid)}`;
    // text/plain: a "simple" cross-origin request, no preflight per frame.
    this._posting = this._posting
      .then(() => this._fetch(url, { method: "POST", body: data, headers: { "Content-Type": "text/plain;charset=UTF-8" } }))
      .then((response) => {
        if (!response.ok) this._finish(1006, true);
      })
      .catch(() => this._finish(1006, true));
  }

  close(code = 1000) {
    if (this.readyState >= 2) return;
    const opened = this._sid !== null;
    this.readyState = 2;
    this._es?.close();
    if (opened) this._delete(code === 1000).finally(() => this._finish(code, false));
    // else: _begin() deletes the session once it has its id
    else setTimeout(() => this._finish(code, false), 0);
  }

  /** Closes the event stream (not the session) and opens it again after the last event
   * received, as the browser does after a network error. For tests and demos. */
  dropEventStream() {
    if (this.readyState !== 1) return;
    this._es.close();
    this._listen();
  }

  _delete(end) {
    const url = `${this.url}/sse/${encodeURIComponent(this._sid)}${end ? "?end=1" : ""}`;
    return this._posting.then(() => this._fetch(url, { method: "DELETE" })).catch(() => {});
  }

  _finish(code, failed) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this._es?.close();
    this._es = null;
    if (failed) this.onerror?.({});
    this.onclose?.({ code, reason: "" });
  }
}

export class LLMProxyClient {
  /**
   * @param url   ws:// or wss:// URL of a bridge's `/stream`, or a list of them
   *              (reconnects try the next one in turn)
   * @param options.WebSocket        constructor (default `globalThis.WebSocket`)
   * @param options.connectTimeoutMs give up one connection attempt after this (default 10000)
   * @param options.reconnect        reconnect and resume after a drop (default true)
   * @param options.backoff          {baseMs, factor, jitter, maxMs} (default 1000, 1.6, 0.2, 15000)
   * @param options.maxAttempts      reconnect attempts in a row before giving up (default 12)
   * @param options.idleTimeoutMs    with live streams, treat a socket silent this long as dead
   *                                 (default 45000; heartbeats keep it alive; 0: off)
   * @param options.idPrefix         prefix of generated stream ids (default "s")
   * @param options.onStateChange    (state, previous) => void
   * @param options.onSession        (sessionFrame, {resumed}) => void, on every (re)connection
   * @param options.onError          (LLMProxyError) => void, for errors about no live stream
   * @param options.sseUrl           http(s):// base URL of the bridge's HTTP port (`--http-port`):
   *                                 where the SSE transport is served
   * @param options.transport        "auto" (default: WebSocket, SSE when one cannot open and
   *                                 `sseUrl` is set), "websocket" or "sse"
   * @param options.EventSource      constructor for the SSE transport (default `globalThis.EventSource`)
   */
  constructor(url, options = {}) {
    this.urls = Array.isArray(url) ? [...url] : [url];
    if (this.urls.length === 0) throw new TypeError("llmproxy: no URL");
    this._urlIndex = 0;
    this.state = "idle";
    /** The session frame of the current session ({session_id, resume_token, resume_grace_ms}). */
    this.session = null;
    /** How many times the client reconnected (successfully or not). */
    this.reconnects = 0;
    this.onStateChange = options.onStateChange ?? null;
    this.onSession = options.onSession ?? null;
    this.onError = options.onError ?? null;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._sseUrl = options.sseUrl ?? null;
    this._transport = options.transport ?? "auto";
    if (!["auto", "websocket", "sse"].includes(this._transport)) {
      throw new TypeError(`llmproxy: transport must be "auto", "websocket" or "sse", not ${JSON.stringify(this._transport)}`);
    }
    if (this._transport !== "websocket" && this._sseUrl === null && this._transport === "sse") {
      throw new TypeError('llmproxy: transport "sse" needs the bridge\'s HTTP URL as `sseUrl`');
    }
    this._EventSource = options.EventSource ?? globalThis.EventSource;
    /** "websocket" or "sse": what the current (or next) connection uses. */
    this.transport = this._transport === "sse" ? "sse" : "websocket";
    if (typeof this._WebSocket !== "function" && this.transport === "websocket" && this._canFallBack()) {
      this.transport = "sse";
    }
    if (typeof this._WebSocket !== "function" && this.transport === "websocket") {
      throw new TypeError(
        "llmproxy: no WebSocket constructor; pass {WebSocket} (Node 20: run with --experimental-websocket)",
      );
    }
    this._connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this._reconnect = options.reconnect ?? true;
    this._backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    this._maxAttempts = options.maxAttempts ?? 12;
    this._idleTimeoutMs = options.idleTimeoutMs ?? 45000;
    this._idPrefix = options.idPrefix ?? "s";
    this._nextId = 1;
    this._nextNonce = 1;
    this._ws = null;
    this._phase = null; // of the current socket: "opening", "session", "resuming", "ready"
    this._resuming = null; // the handles named in the resume in flight
    this._connecting = null; // {promise, resolve, reject} of connect()
    this._attempt = 0; // failed attempts in a row
    this._retryTimer = null;
    this._connectTimer = null;
    this._idleTimer = null;
    this._lastReceivedAt = null;
    this._outbox = []; // frames written before the socket was ready
    this._streams = new Map(); // id -> live StreamHandle
    this._pings = new Map(); // nonce -> {resolve, reject, sentAt, timer}
    this._lastConnectionError = null;
    this._closeWaiters = []; // close() promises, resolved once the socket is gone
  }

  /** The URL of the current (or next) connection. */
  get url() {
    return this.urls[this._urlIndex];
  }

  /**
   * Opens the WebSocket and waits for its session. Resolves once open (at once
   * if already open); rejects with `LLMProxyError` `connection_failed` or
   * `timeout` if the first connection fails. Safe to call again.
   */
  connect() {
    if (this.state === "open") return Promise.resolve();
    if (this._connecting) return this._connecting.promise;
    if (this.state !== "idle" && this.state !== "reconnecting") {
      return Promise.reject(new LLMProxyError("client_closed", "this client was closed; make a new one"));
    }
    const waiter = {};
    waiter.promise = new Promise((resolve, reject) => Object.assign(waiter, { resolve, reject }));
    this._connecting = waiter;
    if (this.state === "idle") {
      this._setState("connecting");
      this._open();
    }
    return waiter.promise;
  }

  /**
   * Starts a stream and returns its handle at once. Connects first if needed;
   * frames wait in order until the socket is ready (also while reconnecting).
   * @param request  {model, messages, max_tokens, temperature, top_p, stop, seed, tools, tool_choice, conversation, cache, id}
   * @param callbacks {onStarted, onToken, onRestarted, onFrame, onDone, onError}
   * Throws `LLMProxyError` `duplicate_stream_id` if `request.id` names a live stream.
   */
  stream(request, callbacks = {}) {
    const id = request.id ?? `${this._idPrefix}${this._nextId++}`;
    if (this._streams.has(id)) {
      throw new LLMProxyError("duplicate_stream_id", `stream id ${JSON.stringify(id)} is live on this client`);
    }
    const frame = { type: "start", id, model: request.model, messages: request.messages };
    for (const key of START_FIELDS) if (request[key] !== undefined) frame[key] = request[key];
    const handle = new StreamHandle(this, id, frame, callbacks);
    if (this.state === "closing" || this.state === "closed") {
      handle._fail(new LLMProxyError("client_closed", "this client was closed; make a new one", { streamId: id }));
      return handle;
    }
    this._streams.set(id, handle);
    this._send(frame);
    if (this.state === "idle") this.connect().catch(() => {}); // the handle gets the failure
    this._armIdle();
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

  /**
   * Ends the session: closes the socket with code 1000 (the bridge then cancels
   * every stream of the session on the server; nothing stays resumable), and
   * live handles fail with `client_closed`. While reconnecting there is no
   * socket: the server drops the session after its grace period.
   */
  close(code = 1000, reason = "") {
    if (this.state === "closed") return Promise.resolve();
    const error = new LLMProxyError("client_closed", "the client was closed");
    this._clearTimers();
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

  /**
   * Drops the socket without ending the session, as a network failure would
   * (close code 4000): the client reconnects and resumes. For tests and demos.
   */
  dropConnection() {
    if (this._ws !== null && (this.state === "open" || this.state === "connecting" || this.state === "reconnecting")) {
      const ws = this._ws;
      this._socketLost(new LLMProxyError("connection_lost", "connection dropped on purpose", { retryable: true }));
      ws.close(4000, "dropped");
    }
  }

  // -- internals: one socket ----------------------------------------------------

  /** Whether a WebSocket that cannot open may be replaced by the SSE transport. */
  _canFallBack() {
    return this._transport === "auto" && this._sseUrl !== null && typeof this._EventSource === "function";
  }

  /** A connection that never opened: over SSE next, at once, if allowed; else as any loss. */
  _openFailed(error) {
    if (this.transport === "websocket" && this._canFallBack()) {
      this.transport = "sse";
      this._detach();
      this._open();
      return;
    }
    this._socketLost(error);
  }

  _open() {
    const url = this.transport === "sse" ? this._sseUrl : this.url;
    let ws;
    try {
      ws = this.transport === "sse" ? new SseSocket(url, { EventSource: this._EventSource }) : new this._WebSocket(url);
    } catch (err) {
      this._openFailed(new LLMProxyError("connection_failed", String(err?.message ?? err), { retryable: true }));
      return;
    }
    this._ws = ws;
    this._phase = "opening";
    this._connectTimer = setTimeout(() => {
      this._connectTimer = null;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      ws.close();
      this._socketLost(
        new LLMProxyError("timeout", `no connection to ${url} within ${this._connectTimeoutMs} ms`, { retryable: true }),
      );
    }, this._connectTimeoutMs);
    ws.onopen = () => {
      if (this._phase === "opening") this._phase = "session"; // the server speaks first
    };
    ws.onmessage = (event) => this._receive(event.data);
    // RFC 6455 and browsers follow `error` with `close`, which carries the code. Node 20's
    // WebSocket (undici) fires only `error` when the connection is refused: so a failed
    // opening ends here, and an error on an open socket ends it if no close follows soon.
    ws.onerror = () => {
      if (this._ws !== ws) return;
      const error = new LLMProxyError("connection_failed", `cannot connect to ${url}`, { retryable: true });
      if (this._phase === "opening") {
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        this._openFailed(error);
        return;
      }
      setTimeout(() => this._ws === ws && ws.onclose?.({ code: 1006 }), 1000);
    };
    ws.onclose = (event) => {
      const error =
        this._phase === "ready"
          ? this._closeError(event)
          : new LLMProxyError("connection_failed", `cannot connect to ${url} (close code ${event.code})`, {
              retryable: true,
            });
      if (this.state === "closing") this._socketClosed(error);
      else if (this._phase === "opening") this._openFailed(error);
      else this._socketLost(error);
    };
  }

  /** The socket is ready: resume done or not needed. Sends what waited. */
  _ready() {
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this._phase = "ready";
    this._lastReceivedAt = now();
    this._attempt = 0;
    this._lastConnectionError = null;
    if (this.state !== "open") this._setState("open");
    for (const data of this._outbox.splice(0)) this._ws.send(data);
    for (const handle of this._streams.values()) handle._startSent = true; // now on the wire
    this._armIdle();
    if (this._connecting) {
      this._connecting.resolve();
      this._connecting = null;
    }
  }

  /** Every frame of the current socket. */
  _receive(data) {
    if (typeof data !== "string") data = new TextDecoder().decode(data);
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      call(this.onError, new LLMProxyError("protocol_error", "the server sent a frame that is not JSON"));
      return;
    }
    this._lastReceivedAt = now(); // anything, heartbeats included, proves the socket alive
    if (this._phase === "session" || this._phase === "opening") {
      if (frame.type === "session") this._onSession(frame);
      else if (frame.type === "error") this._lastConnectionError = LLMProxyError.fromFrame(frame);
      return;
    }
    if (this._phase === "resuming") {
      this._onResumeAnswer(frame);
      return;
    }
    switch (frame.type) {
      case "pong": {
        const waiter = this._pings.get(frame.nonce);
        if (waiter) {
          this._pings.delete(frame.nonce);
          clearTimeout(waiter.timer);
          waiter.resolve(now() - waiter.sentAt);
        }
        return;
      }
      case "heartbeat":
        return; // only keeps idle connections (and our idle timer) alive
    }
    const handle = frame.id ? this._streams.get(frame.id) : undefined;
    if (frame.type === "error" && frame.seq === 0) {
      // A rejected frame. If it names a stream that has not started, it was that
      // stream's start: the stream ends. A rejected cancel or modify of a stream
      // that is just finishing (unknown_stream) names a started or ended stream:
      // ignored.
      if (handle && handle.state === "pending" && frame.code !== "unknown_stream") handle._receive(frame);
      else if (!handle && !frame.id) {
        this._lastConnectionError = LLMProxyError.fromFrame(frame);
        call(this.onError, this._lastConnectionError);
      }
      return;
    }
    if (handle) handle._receive(frame);
  }

  /** The first frame of a socket. Resume the session we have, or adopt the new one. */
  _onSession(frame) {
    const unfinished = [...this._streams.values()].filter((h) => h._startSent);
    if (this.session === null || !this._reconnect) {
      this.session = frame;
      call(this.onSession, frame, { resumed: false });
      this._ready();
      return;
    }
    // Resume even with no unfinished stream: the session keeps its conversations.
    this._phase = "resuming";
    this._resuming = unfinished;
    this._pendingSession = frame;
    const streams = Object.fromEntries(unfinished.map((h) => [h.id, h.lastSeq]));
    this._ws.send(
      JSON.stringify({
        type: "resume",
        session_id: this.session.session_id,
        resume_token: this.session.resume_token,
        streams,
      }),
    );
  }

  /** `resumed`, or an `expired` error: the answer to our resume. */
  _onResumeAnswer(frame) {
    const handles = this._resuming;
    this._resuming = null;
    if (frame.type === "resumed") {
      const restart = [];
      for (const h of handles) {
        const info = frame.streams?.[h.id];
        if (h.ended) continue;
        if (info && !info.known) {
          restart.push(JSON.stringify(h._startFrame)); // the start never reached the server
        } else if (info && info.live && h._cancelSent) {
          restart.push(JSON.stringify({ type: "cancel", id: h.id })); // may have been lost
        }
      }
      this._outbox.unshift(...restart);
      call(this.onSession, this.session, { resumed: true, streams: frame.streams });
    } else {
      // `expired` (or anything else): the old session is gone. Its streams cannot
      // continue; the new connection's session takes over.
      const base = frame.type === "error" ? LLMProxyError.fromFrame(frame) : null;
      for (const h of handles) {
        h._fail(
          new LLMProxyError(base?.code ?? "expired", base?.detail ?? "the session could not be resumed", {
            streamId: h.id,
            frame: base?.frame ?? null,
          }),
        );
      }
      // Frames waiting for those streams (cancel, modify) have nothing to act on.
      this._outbox = this._outbox.filter((data) => {
        const f = JSON.parse(data);
        return f.type === "start" || f.type === "ping" || this._streams.has(f.id);
      });
      this.session = this._pendingSession;
      call(this.onSession, this.session, { resumed: false, refused: base ?? frame });
    }
    this._pendingSession = null;
    this._ready();
  }

  _send(frame) {
    const data = JSON.stringify(frame);
    if (this._phase === "ready" && this.state === "open") this._ws.send(data);
    else this._outbox.push(data);
    if (frame.type === "start") {
      const handle = this._streams.get(frame.id);
      if (handle) handle._startSent = this._phase === "ready" && this.state === "open";
    }
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

  _detach() {
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this._disarmIdle();
    if (this._ws) this._ws.onopen = this._ws.onmessage = this._ws.onclose = this._ws.onerror = null;
    this._ws = null;
    this._phase = null;
    this._resuming = null;
    this._pendingSession = null;
  }

  /**
   * The socket is gone, not by our `close()`. Reconnect (keeping live handles and
   * the outbox) unless reconnecting is off, the first connection never opened, or
   * the attempts ran out; then every live stream fails.
   */
  _socketLost(error) {
    if (this.state === "closing" || this.state === "closed") {
      this._socketClosed(error);
      return;
    }
    const hadSession = this.session !== null;
    this._detach();
    // A frame that went out on the dead socket may be lost; a start is re-sent if
    // the resume says the server never saw it, so it counts as sent.
    const retryable = error.retryable || error.code === "connection_failed" || error.code === "timeout";
    if (!this._reconnect || !hadSession || !retryable || this._attempt >= this._maxAttempts) {
      if (this._connecting) {
        this._connecting.reject(error);
        this._connecting = null;
      }
      this._socketClosed(error);
      return;
    }
    // Pings cannot be resumed: their pongs would come on the old socket.
    for (const { reject, timer } of this._pings.values()) {
      clearTimeout(timer);
      reject(error);
    }
    this._pings.clear();
    this._outbox = this._outbox.filter((data) => JSON.parse(data).type !== "ping");
    if (this.state !== "reconnecting") this._setState("reconnecting");
    const delay = backoffDelayMs(this._attempt, this._backoff);
    this._attempt += 1;
    this.reconnects += 1;
    this._urlIndex = (this._urlIndex + 1) % this.urls.length;
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this.state === "reconnecting") this._open();
    }, delay);
  }

  /** The end: every live stream fails, the client is closed. */
  _socketClosed(error) {
    this._clearTimers();
    this._detach();
    this._failAll(error);
    if (this._connecting) {
      this._connecting.reject(error);
      this._connecting = null;
    }
    if (this.state !== "closed") this._setState("closed");
    for (const resolve of this._closeWaiters.splice(0)) resolve();
  }

  _clearTimers() {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._disarmIdle();
  }

  /**
   * With live streams on a ready socket, silence longer than idleTimeoutMs means
   * a dead socket (a browser cannot see TCP failures). One timer, not one per frame:
   * it compares against the time of the last frame and re-arms for the rest.
   */
  _armIdle(delayMs = this._idleTimeoutMs) {
    if (!this._idleTimeoutMs || this._idleTimer !== null || this._phase !== "ready") return;
    this._lastReceivedAt ??= now();
    this._idleTimer = setTimeout(() => {
      this._idleTimer = null;
      if (this._ws === null || this._phase !== "ready" || this._streams.size === 0) return; // re-armed by stream()
      const silentMs = now() - this._lastReceivedAt;
      if (silentMs < this._idleTimeoutMs) {
        this._armIdle(this._idleTimeoutMs - silentMs);
        return;
      }
      const ws = this._ws;
      this._socketLost(new LLMProxyError("timeout", `nothing received for ${Math.round(silentMs)} ms`, { retryable: true }));
      ws.close(4000, "idle");
    }, delayMs);
  }

  _disarmIdle() {
    if (this._idleTimer !== null) {
      clearTimeout(this._idleTimer);
      this._idleTimer = null;
    }
  }

  _setState(next) {
    const previous = this.state;
    this.state = move(CLIENT_MOVES, previous, next, "connection");
    call(this.onStateChange, next, previous);
  }
}

export default LLMProxyClient;
