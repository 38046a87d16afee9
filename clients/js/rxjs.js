// An RxJS adapter for llmproxy.js, for Angular (or any RxJS code): one Observable per stream,
// emitting the same state as the React hook and the Vue composable (text, status, timing,
// error, done), with cancel and modify. No build step and no dependency of its own: it extends
// the page's RxJS `Observable`, passed in once.
//
//   import { Observable } from "rxjs";
//   import { LLMProxyClient } from "/js/llmproxy.js";
//   import { makeLLMStreams } from "/js/rxjs.js";
//   const { llmStream$ } = makeLLMStreams({ Observable });
//
//   @Component({ template: `
//     <ng-container *ngIf="answer$ | async as a">
//       <p>{{ a.text }}</p><small>{{ a.status }} · ttft {{ a.timing.ttftMs | number:'1.0-0' }} ms</small>
//     </ng-container>
//     <button (click)="answer$?.cancel()">Stop</button>` })
//   class Chat {
//     answer$ = llmStream$(this.client, { model: "demo", messages: [{ role: "user", content: "Hi" }] });
//     constructor(private client: LLMProxyClient) {}
//   }
//
// The stream starts at the first subscription and is shared: a later subscriber gets the current
// state at once, then every change. The Observable completes after the final state (status
// "done", "cancelled" or "error": an error is a state, so an `async` pipe keeps showing it). When
// the last subscriber unsubscribes while the answer runs, it is cancelled (a component that goes
// away stops its answer). `cancel()` and `modify(change)` act on the running stream.

import { createStreamController } from "./stream-state.js";

const FINAL = new Set(["done", "cancelled", "error"]);

/** @param rx an object with RxJS's `Observable` class */
export function makeLLMStreams({ Observable }) {
  class LLMStreamObservable extends Observable {
    constructor(client, request) {
      const subscribers = new Set();
      let controller = null;
      super((subscriber) => {
        subscribers.add(subscriber);
        if (controller === null) {
          controller = createStreamController(client, (state) => {
            for (const s of [...subscribers]) {
              s.next(state);
              if (FINAL.has(state.status)) s.complete();
            }
          });
          controller.start(request);
        } else {
          subscriber.next(controller.state);
          if (FINAL.has(controller.state.status)) subscriber.complete();
        }
        return () => {
          subscribers.delete(subscriber);
          if (subscribers.size === 0 && !FINAL.has(controller.state.status)) controller.dispose();
        };
      });
      this._controller = () => controller;
    }

    /** The current state (null before the first subscription). */
    get state() {
      return this._controller()?.state ?? null;
    }

    /** Stops the answer; the last state emitted has status "cancelled". */
    cancel() {
      return this._controller()?.cancel();
    }

    /** Amends the running answer: { messages?, append?, keepPartial? }. */
    modify(change) {
      const controller = this._controller();
      return controller ? controller.modify(change) : Promise.reject(new Error("llmproxy: the stream has not started"));
    }
  }

  /** One stream as an Observable of its state (see the module comment). */
  function llmStream$(client, request) {
    return new LLMStreamObservable(client, request);
  }

  return { llmStream$, LLMStreamObservable };
}

export default makeLLMStreams;
