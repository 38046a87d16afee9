"""Fake OpenAI Chat Completions (and Azure OpenAI) server, replaying openai-python's recordings.

`python -m tests.fakes.openai --port 0` serves it; see base.py for the knobs.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from tests.fakes.base import ErrorAnswer, FakeServer, Knobs, Provider, Script, events_of, fake_embedding, generated_tokens, main


def _fixture(name: str) -> bytes:
    return resources.files("tests.fakes").joinpath("fixtures", name).read_bytes()


def _data(event: bytes) -> Any:
    payload = event.decode().strip()[len("data: ") :]
    return None if payload == "[DONE]" else json.loads(payload)


def _compact(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class OpenAIFake(Provider):
    name = "openai"

    def __init__(self) -> None:
        self._recordings = {
            "text": events_of(_fixture("openai_text.sse")),
            "tool": events_of(_fixture("openai_tool_call.sse")),
        }

    def is_stream_request(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith("/chat/completions")

    def unary(self, method: str, path: str, body: Any) -> tuple[int, Any] | None:
        # https://platform.openai.com/docs/api-reference/embeddings/create
        if method != "POST" or not path.endswith("/embeddings"):
            return None
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        data = [{"object": "embedding", "index": i, "embedding": fake_embedding(t)} for i, t in enumerate(texts)]
        return 200, {"object": "list", "data": data, "model": body.get("model", ""), "usage": {"prompt_tokens": 3, "total_tokens": 3}}

    def model_of(self, path: str, body: Any) -> str:
        if "/openai/deployments/" in path:  # Azure: the deployment names the model
            return path.split("/openai/deployments/", 1)[1].split("/", 1)[0]
        return str(body.get("model", ""))

    def script(self, knobs: Knobs) -> Script:
        if knobs.tokens is not None:
            return self._generated(knobs.tokens, knobs.offset, knobs.cached)
        pre: list[bytes] = []
        tokens: list[bytes] = []
        post: list[bytes] = []
        done: list[bytes] = []
        for event in self._recordings.get(knobs.scenario, self._recordings["text"]):
            chunk = _data(event)
            if chunk is None:
                done.append(event)
            elif not chunk["choices"] or chunk["choices"][0].get("finish_reason"):
                post.append(event)
            elif chunk["choices"][0]["delta"].get("content") or chunk["choices"][0]["delta"].get("tool_calls"):
                tokens.append(event)
            elif tokens:
                tokens.append(event)
            else:
                pre.append(event)
        return Script(pre, tokens, post, done)

    def _generated(self, n: int, offset: int = 0, cached: int | None = None) -> Script:
        recording = self._recordings["text"]
        role, template = _data(recording[0]), _data(recording[1])
        finish, usage = _data(recording[-3]), _data(recording[-2])
        tokens = []
        for text in generated_tokens(n, offset):
            template["choices"][0]["delta"]["content"] = text
            tokens.append(_compact(template))
        usage["usage"] = {"prompt_tokens": 14, "completion_tokens": n, "total_tokens": 14 + n}
        if cached is not None:
            usage["usage"]["prompt_tokens_details"] = {"cached_tokens": cached, "audio_tokens": 0}
        return Script([_compact(role)], tokens, [_compact(finish), _compact(usage)], [recording[-1]])

    def error(self, status: int, knobs: Knobs) -> ErrorAnswer:
        # Shapes from https://platform.openai.com/docs/guides/error-codes
        code: str | None = knobs.code
        etype = "invalid_request_error"
        headers = {"content-type": "application/json"}
        if status == 429:
            code = code or "rate_limit_exceeded"
            etype = "requests" if code == "rate_limit_exceeded" else "insufficient_quota"
            message = "Rate limit reached for requests. Please try again in 1s."
            headers.update({"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0",
                            "x-ratelimit-reset-requests": "1s"})
        elif status == 401:
            code = code or "invalid_api_key"
            message = "Incorrect API key provided: sk-fake***abcd. You can find your API key at https://platform.openai.com/account/api-keys."
        elif status == 400 and code == "context_length_exceeded":
            message = "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens."
        elif status == 400 and code == "content_filter":
            message = "The response was filtered due to the prompt triggering Azure OpenAI's content management policy."
        elif status == 503:
            etype, message = "server_error", "The engine is currently overloaded, please try again later"
        elif status >= 500:
            etype, message = "server_error", "The server had an error while processing your request. Sorry about that!"
        else:
            message = "Invalid request."
        body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
        return ErrorAnswer(status, json.dumps(body, indent=4).encode() + b"\n", headers)

    def stream_error_event(self, knobs: Knobs) -> bytes:
        etype = "server_error" if not knobs.code else "requests"
        return _compact({"error": {"message": "The server had an error while processing your request. Sorry about that!",
                                   "type": etype, "param": None, "code": knobs.code}})


def serve(knobs: Knobs | None = None) -> FakeServer:
    return FakeServer(OpenAIFake(), knobs)


if __name__ == "__main__":
    main(OpenAIFake())
