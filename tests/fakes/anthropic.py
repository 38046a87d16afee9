"""Fake Anthropic Messages server, replaying anthropic-sdk-python's recordings.

`python -m tests.fakes.anthropic --port 0` serves it; see base.py for the knobs.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from tests.fakes.base import ErrorAnswer, FakeServer, Knobs, Provider, Script, events_of, generated_tokens, main


def _fixture(name: str) -> bytes:
    return resources.files("tests.fakes").joinpath("fixtures", name).read_bytes()


def _parse(event: bytes) -> tuple[str, Any]:
    name, data = "", None
    for line in event.decode().splitlines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: ") :])
    return name, data


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# https://docs.anthropic.com/en/api/errors
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error", 529: "overloaded_error"}


class AnthropicFake(Provider):
    name = "anthropic"

    def __init__(self) -> None:
        self._recordings = {
            "text": events_of(_fixture("anthropic_basic.sse")),
            "tool": events_of(_fixture("anthropic_tool_use.sse")),
        }

    def is_stream_request(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith("/messages")

    def model_of(self, path: str, body: Any) -> str:
        return str(body.get("model", ""))

    def script(self, knobs: Knobs) -> Script:
        if knobs.tokens is not None:
            script = self._generated(knobs.tokens, knobs.offset)
            if knobs.cached is not None or knobs.cache_write is not None:
                name, start = _parse(script.pre[0])
                start["message"]["usage"]["cache_read_input_tokens"] = knobs.cached or 0
                start["message"]["usage"]["cache_creation_input_tokens"] = knobs.cache_write or 0
                script.pre[0] = _event(name, start)
            return script
        pre: list[bytes] = []
        tokens: list[bytes] = []
        done: list[bytes] = []
        pending = b""  # non-token events between tokens travel with the next token
        for event in self._recordings.get(knobs.scenario, self._recordings["text"]):
            name, _ = _parse(event)
            if name == "message_stop":
                done.append(event)
            elif name == "content_block_delta":
                tokens.append(pending + event)
                pending = b""
            elif tokens:
                pending += event
            else:
                pre.append(event)
        return Script(pre, tokens, [pending] if pending else [], done)

    def _generated(self, n: int, offset: int = 0) -> Script:
        events = self._recordings["text"]
        pre = events[:3]  # message_start, content_block_start, ping
        _, template = _parse(events[3])
        tokens = []
        for text in generated_tokens(n, offset):
            template["delta"]["text"] = text
            tokens.append(_event("content_block_delta", template))
        _, delta = _parse(events[-2])
        delta["usage"]["output_tokens"] = n
        return Script(pre, tokens, [events[-3], _event("message_delta", delta)], [events[-1]])

    def error(self, status: int, knobs: Knobs) -> ErrorAnswer:
        etype = knobs.code or _ERROR_TYPES.get(status, "api_error")
        message = {"overloaded_error": "Overloaded", "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit",
                   "authentication_error": "invalid x-api-key"}.get(etype, "Internal server error" if status >= 500 else "Invalid request")
        body = {"type": "error", "error": {"type": etype, "message": message}, "request_id": "req_011CFakeFakeFake"}
        headers = {"content-type": "application/json", "request-id": "req_011CFakeFakeFake"}
        return ErrorAnswer(status, json.dumps(body, separators=(",", ":")).encode(), headers)

    def stream_error_event(self, knobs: Knobs) -> bytes:
        # https://docs.anthropic.com/en/api/messages-streaming#error-events
        etype = knobs.code or "overloaded_error"
        return f'event: error\ndata: {{"type": "error", "error": {{"type": "{etype}", "message": "Overloaded"}}}}\n\n'.encode()

    def malformed_event(self) -> bytes:
        return b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_de\n\n'


def serve(knobs: Knobs | None = None) -> FakeServer:
    return FakeServer(AnthropicFake(), knobs)


if __name__ == "__main__":
    main(AnthropicFake())
