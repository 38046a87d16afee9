// TypeScript declarations for llmproxy.js (docs/protocol.md is the wire format).

/** `reconnecting`: the socket dropped; live streams wait, the client reconnects and resumes. */
export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closing" | "closed";
export type StreamState = "pending" | "streaming" | "done" | "failed";

/** Error codes sent by the server (docs/protocol.md). */
export type ServerErrorCode =
  | "invalid_request"
  | "malformed_frame"
  | "unknown_frame_type"
  | "frame_too_large"
  | "unknown_model"
  | "duplicate_stream_id"
  | "too_many_streams"
  | "unknown_stream"
  | "rate_limited"
  | "overloaded"
  | "upstream_unauthenticated"
  | "context_length_exceeded"
  | "content_filtered"
  | "upstream_error"
  | "timeout"
  | "unavailable"
  | "expired"
  | "internal";

/** Error codes made by the client itself. */
export type ClientErrorCode = "connection_failed" | "connection_lost" | "client_closed" | "timeout" | "protocol_error" | "unknown_stream";

export type ErrorCode = ServerErrorCode | ClientErrorCode;

export type FinishReason = "stop" | "length" | "tool_calls" | "content_filter" | "cancelled";

export interface ToolCall {
  id: string;
  type: "function";
  function: { name: string; arguments: string };
}

export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool";
  content?: string | Array<{ type: "text"; text: string }>;
  name?: string;
  tool_call_id?: string;
  tool_calls?: ToolCall[];
}

export interface ToolDefinition {
  type: "function";
  function: { name: string; description?: string; parameters?: Record<string, unknown> };
}

export interface StreamRequest {
  model: string;
  messages: ChatMessage[];
  /** Client-chosen stream id (1-128 characters); generated when left out. */
  id?: string;
  temperature?: number;
  top_p?: number;
  max_tokens?: number;
  stop?: string | string[];
  seed?: number;
  tools?: ToolDefinition[];
  tool_choice?: "auto" | "none" | "required" | string | { type: "function"; function: { name: string } };
  /** Keep this conversation's history on the server: send only the new user message. */
  conversation?: string;
  /** The server's response cache for this request (docs/caching.md). */
  cache?: { skip_read?: boolean; skip_write?: boolean; ttl_s?: number };
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  reasoning_tokens: number;
  /** Prompt tokens read from / written to the provider's prompt cache (present when non-zero). */
  cached_input_tokens?: number;
  cache_write_input_tokens?: number;
  /** The answer was replayed from the response cache: these are the recorded answer's counts. */
  cached?: boolean;
}

/** The answer was replayed from the server's response cache. */
export interface CacheHit {
  kind: "exact" | "semantic";
  /** The prompts' similarity (1 for an exact hit). */
  score: number;
}

/** One upstream attempt's own usage (a stream continued on another deployment has several). */
export interface AttemptUsage {
  deployment: string;
  usage: Usage;
}

export interface Timing {
  ttft_ms: number;
  total_ms: number;
  tokens: number;
  tokens_per_s: number;
  itl_p50_ms: number;
  itl_p95_ms: number;
  itl_p99_ms: number;
  itl_max_ms: number;
}

/** Every server frame carries `token` ("" unless a token frame) and `latency` ("12ms"). */
interface FrameBase {
  token: string;
  latency: string;
}

export interface StartedFrame extends FrameBase {
  type: "started";
  id: string;
  seq: number;
  model: string;
  provider: string;
  upstream_model: string;
  deployment: string;
  cache?: CacheHit;
}

export interface TokenFrame extends FrameBase {
  type: "token";
  id: string;
  seq: number;
  /** Present when several tokens were merged into this frame. */
  count?: number;
}

export interface ReasoningFrame extends FrameBase {
  type: "reasoning";
  id: string;
  seq: number;
  text: string;
}

export interface ToolCallFrame extends FrameBase {
  type: "tool_call";
  id: string;
  seq: number;
  index: number;
  call_id: string;
  name: string;
  arguments: string;
}

export interface DoneFrame extends FrameBase {
  type: "done";
  id: string;
  seq: number;
  finish_reason: FinishReason;
  usage: Usage;
  timing: Timing;
  deployment: string;
  /** Present when more than one attempt answered: each one's usage, in order; their sum is `usage`. */
  attempts?: AttemptUsage[];
  cache?: CacheHit;
}

export interface ErrorFrame extends FrameBase {
  type: "error";
  id: string;
  /** 0: the frame was rejected and no stream changed; > 0: the stream ended in failure. */
  seq: number;
  code: ServerErrorCode;
  message: string;
  retryable: boolean;
  retry_after_ms?: number;
  usage?: Usage;
  timing?: Timing;
  deployment?: string;
  /** As in DoneFrame, when the error ended a stream that more than one attempt answered. */
  attempts?: AttemptUsage[];
}

export interface PongFrame extends FrameBase {
  type: "pong";
  nonce: number;
  server_time_us: number;
}

/** The first frame of every connection. */
export interface SessionFrame extends FrameBase {
  type: "session";
  session_id: string;
  /** Secret: proves the right to resume the session. */
  resume_token: string;
  /** How long streams outlive a dropped connection (default 30000). */
  resume_grace_ms: number;
}

export interface ResumedStream {
  after_seq: number;
  replayed: number;
  live: boolean;
  /** false: the server never saw this stream (its start was lost); the client starts it again. */
  known: boolean;
}

export interface ResumedFrame extends FrameBase {
  type: "resumed";
  session_id: string;
  streams: Record<string, ResumedStream>;
}

/** A `modify` stopped the generation and started the amended one; seqs continue. */
export interface RestartedFrame extends FrameBase {
  type: "restarted";
  id: string;
  seq: number;
  /** false: discard the text shown so far for this stream. */
  keep_partial: boolean;
}

export interface HeartbeatFrame extends FrameBase {
  type: "heartbeat";
  id: string;
  idle_ms: number;
}

export type StreamFrame = StartedFrame | TokenFrame | ReasoningFrame | ToolCallFrame | RestartedFrame | DoneFrame | ErrorFrame;
export type ServerFrame = StreamFrame | PongFrame | SessionFrame | ResumedFrame | HeartbeatFrame;

export class LLMProxyError extends Error {
  readonly name: "LLMProxyError";
  readonly code: ErrorCode;
  /** The server's (or client's) message without the code prefix. */
  readonly detail: string;
  readonly retryable: boolean;
  /** How long the provider (or a limit) asked to wait, when it said. */
  readonly retryAfterMs: number | null;
  readonly streamId: string | null;
  /** The error frame, when the error came from the server. */
  readonly frame: ErrorFrame | null;
  static fromFrame(frame: ErrorFrame): LLMProxyError;
}

export interface StreamCallbacks {
  onStarted?: ((frame: StartedFrame) => void) | null;
  onToken?: ((text: string, frame: TokenFrame) => void) | null;
  /** After `modify`: when `frame.keep_partial` is false, `text` starts afresh. */
  onRestarted?: ((frame: RestartedFrame) => void) | null;
  /** Every frame of the stream, including reasoning and tool_call. */
  onFrame?: ((frame: StreamFrame) => void) | null;
  onDone?: ((frame: DoneFrame) => void) | null;
  onError?: ((error: LLMProxyError) => void) | null;
}

export class StreamHandle implements AsyncIterable<string> {
  readonly id: string;
  readonly state: StreamState;
  readonly started: StartedFrame | null;
  /** The last sequence number received (sent in `resume`). */
  readonly lastSeq: number;
  /** Frames dropped as already delivered (a replay overlap). */
  readonly duplicates: number;
  /** How many times `modify` restarted the stream. */
  readonly restarts: number;
  /** The answer so far (since the last restart that dropped the partial answer). */
  readonly text: string;
  readonly ended: boolean;
  /** Resolves to the `done` frame; rejects with `LLMProxyError` if the stream failed. */
  readonly done: Promise<DoneFrame>;
  onStarted: StreamCallbacks["onStarted"];
  onToken: StreamCallbacks["onToken"];
  onRestarted: StreamCallbacks["onRestarted"];
  onFrame: StreamCallbacks["onFrame"];
  onDone: StreamCallbacks["onDone"];
  onError: StreamCallbacks["onError"];
  /** Asks the server to stop; the stream ends with finish_reason "cancelled". Idempotent. */
  cancel(): Promise<DoneFrame>;
  /**
   * Stops the current generation and starts the amended one under the same id.
   * Resolves to the `restarted` frame; rejects if the stream ends first.
   */
  modify(change: { messages?: ChatMessage[]; append?: ChatMessage[]; keepPartial?: boolean }): Promise<RestartedFrame>;
  /** Token texts as they arrive; throws `LLMProxyError` on failure; breaking out cancels. */
  [Symbol.asyncIterator](): AsyncIterator<string>;
}

/** Any constructor with the browser WebSocket API (browsers, Node 22, Node 20 with --experimental-websocket). */
export type WebSocketConstructor = new (url: string) => WebSocket;

export interface Backoff {
  /** First delay; default 1000. */
  baseMs: number;
  /** Growth per attempt; default 1.6. */
  factor: number;
  /** Relative jitter, +/-; default 0.2. */
  jitter: number;
  /** Cap before jitter; default 15000. */
  maxMs: number;
}

export const DEFAULT_BACKOFF: Readonly<Backoff>;
/** The delay before reconnect attempt `attempt` (0-based). */
export function backoffDelayMs(attempt: number, backoff?: Backoff, random?: () => number): number;

export interface ClientOptions {
  WebSocket?: WebSocketConstructor;
  /** One connection attempt, up to its session (and resume); default 10000. */
  connectTimeoutMs?: number;
  /** Reconnect and resume after a drop; default true. */
  reconnect?: boolean;
  backoff?: Partial<Backoff>;
  /** Failed reconnect attempts in a row before live streams fail; default 12. */
  maxAttempts?: number;
  /** With live streams, a socket silent this long is treated as dead; default 45000, 0: off. */
  idleTimeoutMs?: number;
  /** Every (re)connection: the session in use, and whether the old one was resumed. */
  onSession?: ((session: SessionFrame, info: { resumed: boolean; streams?: Record<string, ResumedStream>; refused?: ErrorFrame }) => void) | null;
  /** Prefix of generated stream ids; default "s". */
  idPrefix?: string;
  onStateChange?: ((state: ConnectionState, previous: ConnectionState) => void) | null;
  /** Errors about no live stream (e.g. `unavailable` before the bridge closes). */
  onError?: ((error: LLMProxyError) => void) | null;
  /** http(s):// base URL of the bridge's HTTP port (`--http-port`), where the SSE transport is served. */
  sseUrl?: string | null;
  /** "auto" (default: WebSocket, SSE when one cannot open and `sseUrl` is set), "websocket" or "sse". */
  transport?: "auto" | "websocket" | "sse";
  /** EventSource constructor for the SSE transport; default `globalThis.EventSource`. */
  EventSource?: new (url: string) => EventSource;
}

/** Our protocol over SSE behind a WebSocket's interface (what the client uses when `transport` is "sse"). */
export class SseSocket {
  constructor(baseUrl: string, options?: { EventSource?: new (url: string) => EventSource; fetch?: typeof fetch });
  readonly url: string;
  readonly readyState: 0 | 1 | 2 | 3;
  /** How many times the event stream was opened (1 + reconnects of ours). */
  readonly eventStreams: number;
  onopen: ((event: object) => void) | null;
  onmessage: ((event: { data: string }) => void) | null;
  onerror: ((event: object) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  send(data: string): void;
  /** 1000 ends the session; any other code only detaches it (it stays resumable). */
  close(code?: number): void;
  /** Closes the event stream (not the session) and reopens it after the last event received. */
  dropEventStream(): void;
}

export class LLMProxyClient {
  /** One bridge URL, or several: each reconnect tries the next. */
  constructor(url: string | string[], options?: ClientOptions);
  readonly urls: string[];
  /** The URL of the current (or next) connection. */
  readonly url: string;
  /** The current session (null before the first connection). */
  readonly session: SessionFrame | null;
  /** Reconnect attempts so far. */
  readonly reconnects: number;
  readonly state: ConnectionState;
  /** What the current (or next) connection uses. */
  readonly transport: "websocket" | "sse";
  onStateChange: ClientOptions["onStateChange"];
  onError: ClientOptions["onError"];
  /** Opens the socket; rejects with `connection_failed` or `timeout`. */
  connect(): Promise<void>;
  /** Starts a stream (connecting first if needed). Throws `duplicate_stream_id` for a live id. */
  stream(request: StreamRequest, callbacks?: StreamCallbacks): StreamHandle;
  /** Application-level ping: resolves to the round trip in milliseconds. */
  ping(options?: { timeoutMs?: number }): Promise<number>;
  /** Ends the session (close code 1000: the server cancels its streams); live streams fail with `client_closed`. */
  close(code?: number, reason?: string): Promise<void>;
  /** Drops the socket as a network failure would (code 4000); the client reconnects and resumes. */
  dropConnection(): void;
}

export default LLMProxyClient;
