// TypeScript declarations for rxjs.js.
import type { Observable } from "rxjs";
import type { DoneFrame, LLMProxyClient, RestartedFrame, StreamRequest } from "./llmproxy.js";
import type { LLMStreamState, ModifyChange } from "./stream-state.js";

export type { LLMStreamState, ModifyChange };

/** One answer: an Observable of its state, with cancel and modify. */
export interface LLMStreamObservable extends Observable<LLMStreamState> {
  /** The current state (null before the first subscription). */
  readonly state: LLMStreamState | null;
  cancel(): Promise<DoneFrame> | undefined;
  modify(change: ModifyChange): Promise<RestartedFrame>;
}

export function makeLLMStreams(rx: { Observable: typeof Observable }): {
  llmStream$(client: LLMProxyClient, request: StreamRequest): LLMStreamObservable;
  LLMStreamObservable: new (client: LLMProxyClient, request: StreamRequest) => LLMStreamObservable;
};
export default makeLLMStreams;
