// TypeScript declarations for stream-state.js.
import type { ChatMessage, DoneFrame, LLMProxyClient, LLMProxyError, RestartedFrame, StreamHandle, StreamRequest } from "./llmproxy.js";

export type LLMStreamStatus = "idle" | "waiting" | "streaming" | "done" | "cancelled" | "error";

export interface LLMStreamTiming {
  /** From start() to the first token, measured in the page; null before it. */
  ttftMs: number | null;
  tokens: number;
  elapsedMs: number;
  tokensPerS: number;
  /** The server's timing from the done frame, once the answer ended. */
  server: DoneFrame["timing"] | null;
}

export interface LLMStreamState {
  readonly text: string;
  readonly status: LLMStreamStatus;
  readonly timing: LLMStreamTiming;
  readonly error: LLMProxyError | null;
  readonly done: DoneFrame | null;
}

export interface ModifyChange {
  messages?: ChatMessage[];
  append?: ChatMessage[];
  keepPartial?: boolean;
}

export interface StreamController {
  readonly state: LLMStreamState;
  start(request: StreamRequest): StreamHandle;
  cancel(): Promise<DoneFrame> | undefined;
  modify(change: ModifyChange): Promise<RestartedFrame>;
  dispose(): void;
}

export const STATUS_MOVES: Record<LLMStreamStatus, LLMStreamStatus[]>;
export const INITIAL_STATE: LLMStreamState;
export function createStreamController(client: LLMProxyClient, onChange: (state: LLMStreamState) => void): StreamController;
