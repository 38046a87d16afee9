// TypeScript declarations for vue.js.
import type { LLMProxyClient, StreamRequest, StreamHandle, DoneFrame, RestartedFrame, LLMProxyError } from "./llmproxy.js";
import type { LLMStreamStatus, LLMStreamTiming, ModifyChange } from "./stream-state.js";

export type { LLMStreamStatus, LLMStreamTiming, ModifyChange };

/** A Vue Ref's shape (the page's Vue provides the real one). */
export interface ShallowRefLike<T> {
  value: T;
}

export interface UseLLMStream {
  text: ShallowRefLike<string>;
  status: ShallowRefLike<LLMStreamStatus>;
  timing: ShallowRefLike<LLMStreamTiming>;
  error: ShallowRefLike<LLMProxyError | null>;
  done: ShallowRefLike<DoneFrame | null>;
  start(request: StreamRequest): StreamHandle;
  cancel(): Promise<DoneFrame> | undefined;
  modify(change: ModifyChange): Promise<RestartedFrame>;
  dispose(): void;
}

interface VueLike {
  shallowRef: any;
  getCurrentScope: any;
  onScopeDispose: any;
}

export function makeUseLLMStream(Vue: VueLike): (client: LLMProxyClient) => UseLLMStream;
/** Uses `globalThis.Vue`. */
export function useLLMStream(client: LLMProxyClient): UseLLMStream;
export default makeUseLLMStream;
