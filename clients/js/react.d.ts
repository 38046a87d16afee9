// TypeScript declarations for react.js.
import type { DoneFrame, LLMProxyClient, LLMProxyError, RestartedFrame, StreamHandle, StreamRequest, ChatMessage } from "./llmproxy.js";

import type { LLMStreamStatus, LLMStreamTiming } from "./stream-state.js";
export type { LLMStreamStatus, LLMStreamTiming };

export interface LLMStream {
  text: string;
  status: LLMStreamStatus;
  timing: LLMStreamTiming;
  error: LLMProxyError | null;
  done: DoneFrame | null;
  /** Starts a stream (cancelling the previous one if it still runs). */
  start(request: StreamRequest): StreamHandle;
  cancel(): Promise<DoneFrame> | undefined;
  modify(change: { messages?: ChatMessage[]; append?: ChatMessage[]; keepPartial?: boolean }): Promise<RestartedFrame>;
}

interface ReactLike {
  useState: any;
  useRef: any;
  useCallback: any;
  useEffect: any;
}

export function makeUseLLMStream(React: ReactLike): (client: LLMProxyClient) => LLMStream;
/** Uses `globalThis.React`. */
export function useLLMStream(client: LLMProxyClient): LLMStream;
export default makeUseLLMStream;
