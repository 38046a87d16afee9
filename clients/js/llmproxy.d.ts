// TypeScript declarations for llmproxy.js (docs/protocol.md is the wire format).

export type ConnectionState = "idle" | "connecting" | "open" | "closing" | "closed";
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
  | "internal";

/** Error codes made by the client itself. */
export type ClientErrorCode = "connection_failed" | "connection_lost" | "client_closed" | "timeout" | "protocol_error";

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
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  reasoning_tokens: number;
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
}

export interface PongFrame extends FrameBase {
  type: "pong";
  nonce: number;
  server_time_us: number;
}

export type StreamFrame = StartedFrame | TokenFrame | ReasoningFrame | ToolCallFrame | DoneFrame | ErrorFrame;
export type ServerFrame = StreamFrame | PongFrame;

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
  /** Every frame of the stream, including reasoning and tool_call. */
  onFrame?: ((frame: StreamFrame) => void) | null;
  onDone?: ((frame: DoneFrame) => void) | null;
  onError?: ((error: LLMProxyError) => void) | null;
}

export class StreamHandle implements AsyncIterable<string> {
  readonly id: string;
  readonly state: StreamState;
  readonly started: StartedFrame | null;
  /** The last sequence number received. */
  readonly lastSeq: number;
  /** The text received so far. */
  readonly text: string;
  readonly ended: boolean;
  /** Resolves to the `done` frame; rejects with `LLMProxyError` if the stream failed. */
  readonly done: Promise<DoneFrame>;
  onStarted: StreamCallbacks["onStarted"];
  onToken: StreamCallbacks["onToken"];
  onFrame: StreamCallbacks["onFrame"];
  onDone: StreamCallbacks["onDone"];
  onError: StreamCallbacks["onError"];
  /** Asks the server to stop; the stream ends with finish_reason "cancelled". Idempotent. */
  cancel(): Promise<DoneFrame>;
  /** Token texts as they arrive; throws `LLMProxyError` on failure; breaking out cancels. */
  [Symbol.asyncIterator](): AsyncIterator<string>;
}

/** Any constructor with the browser WebSocket API (browsers, Node 22, Node 20 with --experimental-websocket). */
export type WebSocketConstructor = new (url: string) => WebSocket;

export interface ClientOptions {
  WebSocket?: WebSocketConstructor;
  /** Default 10000. */
  connectTimeoutMs?: number;
  /** Prefix of generated stream ids; default "s". */
  idPrefix?: string;
  onStateChange?: ((state: ConnectionState, previous: ConnectionState) => void) | null;
  /** Errors about no live stream (e.g. `unavailable` before the bridge closes). */
  onError?: ((error: LLMProxyError) => void) | null;
}

export class LLMProxyClient {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly state: ConnectionState;
  onStateChange: ClientOptions["onStateChange"];
  onError: ClientOptions["onError"];
  /** Opens the socket; rejects with `connection_failed` or `timeout`. */
  connect(): Promise<void>;
  /** Starts a stream (connecting first if needed). Throws `duplicate_stream_id` for a live id. */
  stream(request: StreamRequest, callbacks?: StreamCallbacks): StreamHandle;
  /** Application-level ping: resolves to the round trip in milliseconds. */
  ping(options?: { timeoutMs?: number }): Promise<number>;
  /** Closes the socket; live streams fail with `client_closed`. */
  close(code?: number, reason?: string): Promise<void>;
}

export default LLMProxyClient;
