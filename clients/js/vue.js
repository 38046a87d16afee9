// A Vue 3 composable for chat UIs over llmproxy.js, with the same state as the React hook
// (react.js): text, status, timing, error, done; and start, cancel, modify. No build step and
// no dependency of its own: it uses the page's Vue, passed in once.
//
//   import * as Vue from "vue";                        // or from an import map / CDN
//   import { LLMProxyClient } from "/js/llmproxy.js";
//   import { makeUseLLMStream } from "/js/vue.js";
//   const useLLMStream = makeUseLLMStream(Vue);
//   const client = new LLMProxyClient(`ws://${location.host}/stream`);
//
//   export default {
//     setup() {
//       const { text, status, timing, error, start, cancel, modify } = useLLMStream(client);
//       const ask = () => start({ model: "demo", messages: [{ role: "user", content: "Hi" }] });
//       return { text, status, timing, error, ask, cancel };
//     },
//     template: `<button @click="ask">Ask</button>
//                <button @click="cancel" :disabled="status !== 'streaming'">Stop</button>
//                <p>{{ text }}</p><p v-if="error">{{ error.code }}</p>`,
//   };
//
// Each field is a shallow ref (frames and errors are not made deeply reactive). Inside a
// component (an effect scope) the answer is cancelled when the component unmounts.

import { createStreamController, INITIAL_STATE } from "./stream-state.js";

/** Builds `useLLMStream(client)` on the given Vue (shallowRef, getCurrentScope, onScopeDispose). */
export function makeUseLLMStream(Vue) {
  const { shallowRef, getCurrentScope, onScopeDispose } = Vue;

  return function useLLMStream(client) {
    const refs = Object.fromEntries(Object.entries(INITIAL_STATE).map(([k, v]) => [k, shallowRef(v)]));
    const controller = createStreamController(client, (state) => {
      for (const key of Object.keys(refs)) refs[key].value = state[key];
    });
    if (getCurrentScope()) onScopeDispose(() => controller.dispose());
    return { ...refs, start: controller.start, cancel: controller.cancel, modify: controller.modify, dispose: controller.dispose };
  };
}

/** The composable on `globalThis.Vue` (a page that loads Vue's global build with a script tag). */
export function useLLMStream(client) {
  const Vue = globalThis.Vue;
  if (!Vue) throw new Error("llmproxy: no globalThis.Vue; use makeUseLLMStream(Vue)");
  return (useLLMStream.impl ??= makeUseLLMStream(Vue))(client);
}

export default makeUseLLMStream;
