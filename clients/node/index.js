// llmproxy Node.js backend client over gRPC: one bidi `llmproxy.v1.LLMProxy/Stream` call
// multiplexing any number of stream handles (the Node twin of clients/python/llmproxy_client/
// grpc_client.py).
//
// Theory of operation. The client owns one call at a time. Its `data` events are routed by
// stream id to each handle, which keeps the last `seq` it delivered. When the call fails
// underneath unfinished streams (a restarted listener, a proxy that cut the connection), the
// client opens a new call after a backoff with jitter, sends `resume` with each unfinished
// stream's last `seq`, and the server replays what was missed: nothing lost, and frames at or
// below a handle's last `seq` are dropped, so nothing is delivered twice. Frames written while
// no call is ready wait in `pending` and go out after the session (or resume) handshake. A
// stream that ends with an error frame rejects its `done` promise with `LLMProxyError` and its
// iterator throws it: it is never reported as finished.
//
// The types of every frame are generated from protos/ by @grpc/proto-loader's
// proto-loader-gen-types (`npm run generate`, into generated/); index.d.ts uses them.

import path from "node:path";
import { fileURLToPath } from "node:url";
import { existsSync } from "node:fs";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
// The repository's protos/ (a packed copy under ./protos wins, for a published package).
const PROTO_ROOTS = [path.join(HERE, "protos"), path.join(HERE, "..", "..", "protos")];
const PROTO_FILE = "llmproxy/v1/llmproxy.proto";

const SEQUENCED = new Set(["started", "token", "done", "error", "tool_call", "reasoning", "restarted", "failover"]);
// A call that fails with one of these may be resumed; others (bad credentials, a bug) may not.
const RESUMABLE = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.ABORTED,
  grpc.status.RESOURCE_EXHAUSTED,
  grpc.status.UNKNOWN,
  grpc.status.INTERNAL,
]);

/** Options for @grpc/proto-loader: field names as in the .proto, 64-bit integers as numbers,
 * enums as their names, `kind` names the oneof member that is set. */
export const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

/** Loads the llmproxy.v1 package definition (the service constructors and message types). */
export function loadProto(protoRoot) {
  const root = protoRoot ?? PROTO_ROOTS.find((r) => existsSync(path.join(r, PROTO_FILE)));
  if (!root) throw new Error(`cannot find ${PROTO_FILE}; pass protoRoot`);
  const definition = protoLoader.loadSync(PROTO_FILE, { ...LOADER_OPTIONS, includeDirs: [root] });
  return grpc.loadPackageDefinition(definition).llmproxy.v1;
}

/** An error frame from the server, or the call failing underneath a stream. */
export class LLMProxyError extends Error {
  constructor(code, message, { retryable = false, retryAfterMs = 0 } = {}) {
    super(`${code}: ${message}`);
    this.name = "LLMProxyError";
    this.code = code;
    this.detail = message;
    this.retryable = retryable;
    this.retryAfterMs = retryAfterMs;
  }

  static fromFrame(e) {
    const code = String(e.code).replace(/^ERROR_CODE_/, "").toLowerCase();
    return new LLMProxyError(code, e.message, { retryable: e.retryable, retryAfterMs: Number(e.retry_after_ms || 0) });
  }
}

/** Reconnect delays: base x factor^n, +/- jitter, capped (as clients/python's Backoff). */
export class Backoff {
  constructor({ baseMs = 1000, factor = 1.6, jitter = 0.2, capMs = 15000 } = {}) {
    Object.assign(this, { baseMs, factor, jitter, capMs });
  }

  delayMs(attempt, random = Math.random) {
    const raw = Math.min(this.capMs, this.baseMs * this.factor ** attempt);
    return raw * (1 + (random() * 2 - 1) * this.jitter);
  }
}

/** One stream: `for await (const text of handle)`, or `handle.frames()` for every frame. */
export class StreamHandle {
  constructor(client, id, startFrame) {
    this.id = id;
    this.startFrame = startFrame;
    this.started = null;
    this.lastSeq = 0;
    this.duplicates = 0; // frames dropped as already delivered (should stay 0)
    this.finished = false;
    this._client = client;
    this._queue = [];
    this._wake = null;
    this._error = null;
    /** The `done` frame; rejects with LLMProxyError if the stream failed. */
    this.done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.done.catch(() => {}); // handled by whoever awaits it or iterates
  }

  async *frames() {
    for (;;) {
      while (this._queue.length) {
        const frame = this._queue.shift();
        if (frame === END) {
          if (this._error) throw this._error;
          return;
        }
        yield frame;
      }
      await new Promise((wake) => (this._wake = wake));
    }
  }

  async *[Symbol.asyncIterator]() {
    for await (const frame of this.frames()) if (frame.kind === "token") yield frame.token.text;
  }

  /** Asks the server to cancel; the stream then ends with finish reason CANCELLED. */
  cancel() {
    this._client._write({ cancel: { stream_id: this.id } });
  }

  _push(item) {
    this._queue.push(item);
    const wake = this._wake;
    this._wake = null;
    if (wake) wake();
  }

  _deliver(frame) {
    const kind = frame.kind;
    const seq = SEQUENCED.has(kind) ? Number(frame[kind].seq || 0) : 0;
    if (seq) {
      if (seq <= this.lastSeq) {
        this.duplicates += 1;
        return;
      }
      this.lastSeq = seq;
    }
    if (kind === "started") this.started = frame.started;
    this._push(frame);
    if (kind === "done") this._settle(frame.done, null);
    else if (kind === "error") this._settle(null, LLMProxyError.fromFrame(frame.error));
  }

  _settle(result, error) {
    if (this.finished) return;
    this.finished = true;
    if (error) {
      this._error = error;
      this._reject(error);
    } else this._resolve(result);
    this._push(END);
  }
}

const END = Symbol("end");

function toMessage(m) {
  return {
    role: m.role,
    content: m.content ?? "",
    name: m.name ?? "",
    tool_call_id: m.tool_call_id ?? "",
    tool_calls: (m.tool_calls ?? []).map((c) => ({ id: c.id, name: c.function.name, arguments: c.function.arguments ?? "" })),
  };
}

export class LLMProxyClient {
  /**
   * @param {string} target host:port of the llmproxy gRPC server
   * @param {object} [options] credentials (grpc.credentials.createInsecure() by default),
   *   apiKey (sent as `authorization: Bearer <key>`), reconnect (true), backoff, maxAttempts (12),
   *   random (for the jitter), protoRoot, channelOptions
   */
  constructor(target, options = {}) {
    const proto = loadProto(options.protoRoot);
    this._stub = new proto.LLMProxy(target, options.credentials ?? grpc.credentials.createInsecure(), options.channelOptions ?? {});
    this._metadata = new grpc.Metadata();
    if (options.apiKey) this._metadata.set("authorization", `Bearer ${options.apiKey}`);
    for (const [k, v] of Object.entries(options.metadata ?? {})) this._metadata.set(k, v);
    this._reconnect = options.reconnect ?? true;
    this._backoff = options.backoff instanceof Backoff ? options.backoff : new Backoff(options.backoff);
    this._maxAttempts = options.maxAttempts ?? 12;
    this._random = options.random ?? Math.random;
    this._call = null;
    this._ready = false; // a call is open and resumed: writes go straight out
    this._running = false;
    this._pending = []; // written while no call was ready
    this._handles = new Map();
    this._pongs = new Map();
    this._ids = 0;
    this._closing = false;
    this._attempt = 0;
    this._timer = null;
    this.session = null; // from the first call's first frame
    this.reconnects = 0;
  }

  /** The public models and the deployments behind each. */
  listModels() {
    return new Promise((resolve, reject) =>
      this._stub.ListModels({}, this._metadata, (err, res) => (err ? reject(err) : resolve(res.models))),
    );
  }

  /** Starts a stream and returns its handle at once (the start frame is sent in the background). */
  stream({ model, messages, streamId, temperature, topP, maxTokens, stop = [], seed, conversation = "" }) {
    const id = streamId ?? `node-${++this._ids}`;
    const params = { stop };
    if (temperature !== undefined) params.temperature = temperature;
    if (topP !== undefined) params.top_p = topP;
    if (maxTokens !== undefined) params.max_tokens = maxTokens;
    if (seed !== undefined) params.seed = seed;
    const startFrame = { start: { stream_id: id, model, messages: messages.map(toMessage), params, conversation } };
    const handle = new StreamHandle(this, id, startFrame);
    this._handles.set(id, handle);
    this._write(startFrame);
    return handle;
  }

  /** Sends a ping; resolves with the pong. */
  ping(nonce = 0) {
    const pong = new Promise((resolve, reject) => this._pongs.set(String(nonce), { resolve, reject }));
    this._write({ ping: { nonce } });
    return pong;
  }

  /** Ends the session (its streams are cancelled) and the call. */
  close() {
    this._closing = true;
    clearTimeout(this._timer);
    if (this._call && this._ready) this._call.write({ close: {} });
    if (this._call) {
      this._call.end();
      this._call.cancel();
    }
    this._fail(new LLMProxyError("cancelled", "the client was closed"));
    this._stub.close();
  }

  /** Cancels the current call as a network failure would (for tests and demos); the client
   * then reconnects and resumes. */
  dropCall() {
    if (this._call) this._call.cancel();
  }

  _write(frame) {
    if (!this._running) this._open();
    if (this._ready) this._call.write(frame);
    else this._pending.push(frame);
  }

  _unfinished() {
    return [...this._handles.values()].filter((h) => !h.finished);
  }

  /** Opens a call; its first frame is the session, answered by a resume when streams are
   * unfinished; then what was written meanwhile goes out. */
  _open() {
    this._running = true;
    const call = this._stub.Stream(this._metadata);
    this._call = call;
    let phase = "session"; // session -> resuming -> live
    let sessionFrame = null;
    const flush = () => {
      const pending = this._pending;
      this._pending = [];
      for (const frame of pending) call.write(frame);
      this._ready = true;
      this._attempt = 0;
    };
    call.on("data", (frame) => {
      if (call !== this._call) return;
      if (phase === "session") {
        sessionFrame = frame.session;
        const unfinished = this._unfinished();
        if (this.session === null || unfinished.length === 0) {
          this.session = sessionFrame;
          phase = "live";
          flush();
          return;
        }
        const streams = unfinished.map((h) => ({ stream_id: h.id, last_seq: h.lastSeq }));
        call.write({ resume: { session_id: this.session.session_id, resume_token: this.session.resume_token, streams } });
        phase = "resuming";
        return;
      }
      if (phase === "resuming") {
        phase = "live";
        if (frame.kind !== "resumed") {
          this._fail(LLMProxyError.fromFrame(frame.error)); // expired: a fresh session
          this.session = sessionFrame;
        } else {
          const restart = frame.resumed.streams.filter((s) => !s.known).map((s) => this._handles.get(s.stream_id));
          const starts = restart.filter((h) => h && !this._pending.includes(h.startFrame)).map((h) => h.startFrame);
          this._pending.unshift(...starts);
        }
        flush();
        return;
      }
      this._dispatch(frame);
    });
    call.on("error", (err) => this._callEnded(call, err));
    call.on("end", () => this._callEnded(call, null));
  }

  _callEnded(call, err) {
    if (call !== this._call) return;
    this._call = null;
    this._ready = false;
    this._running = false;
    const code = err ? err.code : grpc.status.OK;
    const error = callError(err);
    const resumable = err && (RESUMABLE.has(code) || (code === grpc.status.CANCELLED && !this._closing));
    if (this._closing || !resumable || !this._reconnect || this._attempt >= this._maxAttempts || this._unfinished().length === 0) {
      this._fail(error);
      return;
    }
    const delay = this._backoff.delayMs(this._attempt, this._random);
    this._attempt += 1;
    this.reconnects += 1;
    this._running = true; // writes meanwhile queue up in pending
    this._timer = setTimeout(() => this._open(), delay);
  }

  _dispatch(frame) {
    const kind = frame.kind;
    if (kind === "pong") {
      const waiter = this._pongs.get(String(frame.pong.nonce));
      this._pongs.delete(String(frame.pong.nonce));
      waiter?.resolve(frame.pong);
      return;
    }
    if (kind === "session" || kind === "resumed" || !kind) return;
    const handle = this._handles.get(frame[kind].stream_id);
    if (!handle) return;
    if (kind === "error" && !Number(frame.error.seq) && handle.started && frame.error.code !== "ERROR_CODE_EXPIRED") return;
    handle._deliver(frame);
    if (handle.finished) this._handles.delete(handle.id);
  }

  _fail(error) {
    for (const handle of this._handles.values()) handle._settle(null, error);
    this._handles.clear();
    for (const waiter of this._pongs.values()) waiter.reject(error);
    this._pongs.clear();
  }
}

function callError(err) {
  if (!err) return new LLMProxyError("unavailable", "the stream call ended", { retryable: true });
  const code = err.code === grpc.status.UNAUTHENTICATED ? "unauthenticated" : "unavailable";
  const name = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) ?? String(err.code);
  return new LLMProxyError(code, `gRPC call failed: ${name}`, { retryable: code === "unavailable" });
}

export { grpc };
