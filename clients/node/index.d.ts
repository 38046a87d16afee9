// Types of the llmproxy Node gRPC client. Frame types are generated from protos/ by
// proto-loader-gen-types (`npm run generate`, run on `npm install`) into generated/.
import type * as grpcJs from "@grpc/grpc-js";
import type { ServerFrame__Output } from "./generated/llmproxy/v1/ServerFrame";
import type { StreamDone__Output } from "./generated/llmproxy/v1/StreamDone";
import type { StreamStarted__Output } from "./generated/llmproxy/v1/StreamStarted";
import type { SessionInfo__Output } from "./generated/llmproxy/v1/SessionInfo";
import type { Pong__Output } from "./generated/llmproxy/v1/Pong";
import type { ModelInfo__Output } from "./generated/llmproxy/v1/ModelInfo";
import type { ClientFrame } from "./generated/llmproxy/v1/ClientFrame";
import type { ProtoGrpcType } from "./generated/llmproxy";

export type * from "./generated/llmproxy";
export type { ServerFrame__Output as ServerFrame, StreamDone__Output as StreamDone, StreamStarted__Output as StreamStarted };

export declare const LOADER_OPTIONS: Record<string, unknown>;
export declare function loadProto(protoRoot?: string): ProtoGrpcType["llmproxy"]["v1"];
export declare const grpc: typeof grpcJs;

export declare class LLMProxyError extends Error {
  /** "invalid_request", "unavailable", "unauthenticated", "expired", ... */
  code: string;
  detail: string;
  retryable: boolean;
  retryAfterMs: number;
}

export interface BackoffOptions {
  baseMs?: number;
  factor?: number;
  jitter?: number;
  capMs?: number;
}

export declare class Backoff {
  constructor(options?: BackoffOptions);
  delayMs(attempt: number, random?: () => number): number;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool";
  content?: string;
  name?: string;
  tool_call_id?: string;
  tool_calls?: { id: string; function: { name: string; arguments?: string } }[];
}

export interface StreamRequest {
  model: string;
  messages: ChatMessage[];
  streamId?: string;
  temperature?: number;
  topP?: number;
  maxTokens?: number;
  stop?: string[];
  seed?: number;
  conversation?: string;
}

export declare class StreamHandle implements AsyncIterable<string> {
  readonly id: string;
  readonly startFrame: ClientFrame;
  started: StreamStarted__Output | null;
  lastSeq: number;
  duplicates: number;
  finished: boolean;
  /** The `done` frame; rejects with LLMProxyError if the stream failed. */
  readonly done: Promise<StreamDone__Output>;
  /** Every frame of this stream, ending after `done`; throws LLMProxyError on error. */
  frames(): AsyncGenerator<ServerFrame__Output>;
  [Symbol.asyncIterator](): AsyncGenerator<string>;
  cancel(): void;
}

export interface ClientOptions {
  credentials?: grpcJs.ChannelCredentials;
  /** Sent as `authorization: Bearer <key>`. */
  apiKey?: string;
  metadata?: Record<string, string>;
  reconnect?: boolean;
  backoff?: Backoff | BackoffOptions;
  maxAttempts?: number;
  random?: () => number;
  protoRoot?: string;
  channelOptions?: grpcJs.ChannelOptions;
}

export declare class LLMProxyClient {
  constructor(target: string, options?: ClientOptions);
  session: SessionInfo__Output | null;
  reconnects: number;
  listModels(): Promise<ModelInfo__Output[]>;
  stream(request: StreamRequest): StreamHandle;
  ping(nonce?: number): Promise<Pong__Output>;
  close(): void;
  dropCall(): void;
}
