"""Fake Gemini `streamGenerateContent?alt=sse` server, replaying Firebase's recorded streams.

`python -m tests.fakes.gemini --port 0` serves it; see base.py for the knobs. There is no
end-of-stream event: the last event carries `finishReason`, so `cut=N` is the missing finish.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any
from urllib.parse import unquote

from tests.fakes.base import ErrorAnswer, FakeServer, Knobs, Provider, Script, events_of, fake_embedding, generated_tokens, main


def _fixture(name: str) -> bytes:
    return resources.files("tests.fakes").joinpath("fixtures", name).read_bytes()


def _data(event: bytes) -> Any:
    return json.loads(event.decode().strip()[len("data: ") :])


def _event(obj: Any) -> bytes:
    # The recordings' own spacing: ": " after keys, "," between items.
    return b"data: " + json.dumps(obj, separators=(",", ": ")).encode() + b"\n\n"


# https://ai.google.dev/gemini-api/docs/troubleshooting#error-codes
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class GeminiFake(Provider):
    name = "gemini"

    def __init__(self) -> None:
        self._recordings = {
            "text": events_of(_fixture("gemini_basic.sse")),
            "tool": events_of(_fixture("gemini_function_call.sse")),
            "thinking": events_of(_fixture("gemini_thinking.sse")),
        }

    def is_stream_request(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith(":streamGenerateContent")

    def unary(self, method: str, path: str, body: Any) -> tuple[int, Any] | None:
        # https://ai.google.dev/api/embeddings#method:-models.embedcontent
        if method != "POST" or not path.endswith(":embedContent"):
            return None
        text = "".join(p.get("text", "") for p in (body.get("content") or {}).get("parts", []))
        return 200, {"embedding": {"values": fake_embedding(text)}}

    def model_of(self, path: str, body: Any) -> str:
        return unquote(path.split("/models/", 1)[-1].split(":", 1)[0])

    def script(self, knobs: Knobs) -> Script:
        if knobs.tokens is not None:
            return self._generated(knobs.tokens, knobs.offset, knobs.cached)
        return Script([], list(self._recordings.get(knobs.scenario, self._recordings["text"])), [])

    def _generated(self, n: int, offset: int = 0, cached: int | None = None) -> Script:
        recording = self._recordings["text"]
        template, last = _data(recording[0]), _data(recording[-1])
        tokens = []
        for i, text in enumerate(generated_tokens(n, offset)):
            obj = copy.deepcopy(last if i == n - 1 else template)
            obj["candidates"][0]["content"]["parts"][0]["text"] = text
            if i == n - 1:
                obj["usageMetadata"]["candidatesTokenCount"] = n
                obj["usageMetadata"]["totalTokenCount"] = obj["usageMetadata"]["promptTokenCount"] + n
                obj["usageMetadata"]["candidatesTokensDetails"][0]["tokenCount"] = n
                if cached is not None:
                    obj["usageMetadata"]["cachedContentTokenCount"] = cached
            tokens.append(_event(obj))
        return Script([], tokens, [])

    def error(self, status: int, knobs: Knobs) -> ErrorAnswer:
        if knobs.code == "API_KEY_INVALID":
            return ErrorAnswer(400, _fixture("gemini_api_key_invalid.json"), {"content-type": "application/json; charset=UTF-8"})
        gstatus = knobs.code or _STATUS.get(status, "INTERNAL")
        message = {"RESOURCE_EXHAUSTED": "Resource has been exhausted (e.g. check quota).",
                   "UNAVAILABLE": "The model is overloaded. Please try again later."}.get(gstatus, "Request failed.")
        error: dict[str, Any] = {"code": status, "message": message, "status": gstatus}
        if status == 429 and knobs.retry_after is not None:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{knobs.retry_after}s"}]
        body = json.dumps({"error": error}, indent=2).encode() + b"\n"
        return ErrorAnswer(status, body, {"content-type": "application/json; charset=UTF-8"})

    def stream_error_event(self, knobs: Knobs) -> bytes:
        gstatus = knobs.code or "UNAVAILABLE"
        return _event({"error": {"code": 503, "message": "The model is overloaded. Please try again later.", "status": gstatus}})

    def malformed_event(self) -> bytes:
        return b'data: {"candidates": [{"content": {"parts": [{"text": "x"}\n\n'


def serve(knobs: Knobs | None = None) -> FakeServer:
    return FakeServer(GeminiFake(), knobs)


if __name__ == "__main__":
    main(GeminiFake())
