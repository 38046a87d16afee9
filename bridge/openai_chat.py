"""OpenAI Chat Completions over the relay: a request body -> a `start` frame, server frames ->
OpenAI's chunks. Sans-I/O: no sockets, no asyncio; bridge/http_api.py drives it.

Theory of operation. `parse_chat_request` validates the body and builds the `StartStream` the
WebSocket path would build (the same codec, bridge/codec.py, so both paths accept the same
messages and tools); a field we cannot honour is a 400 naming it, never silently dropped.
`ChatEncoder` is fed the stream's `ServerFrame`s in order and returns what to write:

    frame            stream: true (SSE events)                    stream: false
    started          the first chunk: delta {role, content: ""}   -
    token            a chunk with delta.content                   text appended
    reasoning        a chunk with delta.reasoning_content         reasoning appended
    tool_call        a chunk with delta.tool_calls[...]           call assembled
    heartbeat        an SSE comment (": heartbeat")               -
    done             the finish_reason chunk (with usage unless   the whole chat.completion
                     include_usage), the usage chunk, [DONE]
    error            `data: {"error": ...}` (the SDK raises)       an error body and status

Usage is always reported (LangChain behind a base URL never asks for it): with
`stream_options.include_usage` as OpenAI does it (a last chunk with `choices: []`, `usage: null`
on the others), otherwise on the chunk that carries `finish_reason`.

Errors: `ERROR_STATUS` maps each proto ErrorCode to an HTTP status and OpenAI's error `type` and
`code` (one table, shared with the Responses API).
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from llmproxy.v1 import llmproxy_pb2 as pb
from bridge.codec import FrameError, decode_client_frame

STREAM_ID = "s"  # each HTTP request is a connection of its own, with one stream


@dataclass(frozen=True, slots=True)
class ApiError(Exception):
    """An error answered in the provider's shape: HTTP status, type, code, message."""

    status: int
    type: str
    code: str | None
    message: str
    param: str | None = None
    retry_after_ms: int = 0


# proto ErrorCode -> (HTTP status, OpenAI error type, OpenAI error code)
ERROR_STATUS: dict[int, tuple[int, str, str | None]] = {
    pb.ERROR_CODE_INVALID_REQUEST: (400, "invalid_request_error", None),
    pb.ERROR_CODE_MALFORMED_FRAME: (400, "invalid_request_error", None),
    pb.ERROR_CODE_UNKNOWN_FRAME_TYPE: (400, "invalid_request_error", None),
    pb.ERROR_CODE_FRAME_TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    pb.ERROR_CODE_UNKNOWN_MODEL: (404, "invalid_request_error", "model_not_found"),
    pb.ERROR_CODE_DUPLICATE_STREAM_ID: (400, "invalid_request_error", None),
    pb.ERROR_CODE_TOO_MANY_STREAMS: (429, "rate_limit_error", "too_many_streams"),
    pb.ERROR_CODE_UNKNOWN_STREAM: (400, "invalid_request_error", None),
    pb.ERROR_CODE_RATE_LIMITED: (429, "rate_limit_error", "rate_limit_exceeded"),
    pb.ERROR_CODE_OVERLOADED: (503, "server_error", "overloaded"),
    pb.ERROR_CODE_UPSTREAM_UNAUTHENTICATED: (502, "server_error", "upstream_unauthenticated"),
    pb.ERROR_CODE_CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error", "context_length_exceeded"),
    pb.ERROR_CODE_CONTENT_FILTERED: (400, "invalid_request_error", "content_filter"),
    pb.ERROR_CODE_UPSTREAM_ERROR: (502, "server_error", "upstream_error"),
    pb.ERROR_CODE_TIMEOUT: (504, "server_error", "timeout"),
    pb.ERROR_CODE_INTERNAL: (500, "server_error", "internal_error"),
    pb.ERROR_CODE_UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    pb.ERROR_CODE_FORBIDDEN_MODEL: (403, "permission_error", "model_not_allowed"),
    pb.ERROR_CODE_QUOTA_EXCEEDED: (429, "insufficient_quota", "insufficient_quota"),
    pb.ERROR_CODE_EXPIRED: (500, "server_error", "expired"),
    pb.ERROR_CODE_UNAVAILABLE: (503, "server_error", "unavailable"),
    pb.ERROR_CODE_SLOW_READER: (500, "server_error", "slow_reader"),
    pb.ERROR_CODE_RESUMED_ELSEWHERE: (500, "server_error", "resumed_elsewhere"),
}


def api_error(code: int, message: str, retry_after_ms: int = 0) -> ApiError:
    """The OpenAI-shaped error of a proto ErrorCode."""
    status, type_, oa_code = ERROR_STATUS.get(code, (500, "server_error", None))
    param = "model" if code in (pb.ERROR_CODE_UNKNOWN_MODEL, pb.ERROR_CODE_FORBIDDEN_MODEL) else None
    return ApiError(status, type_, oa_code, message, param, retry_after_ms)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request_error", None, message, param)


def error_body(error: ApiError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def retry_headers(error: ApiError) -> dict[str, str]:
    """`retry-after` (seconds, rounded up) and `retry-after-ms`, as OpenAI sends them."""
    if not error.retry_after_ms:
        return {}
    return {"retry-after": str(max(1, math.ceil(error.retry_after_ms / 1000))), "retry-after-ms": str(error.retry_after_ms)}


def from_frame_error(exc: FrameError) -> ApiError:
    return api_error(exc.code, exc.message)


# -- request ----------------------------------------------------------------------------------

# Passed on to the start frame as they are.
_PASSED = ("model", "messages", "temperature", "top_p", "max_tokens", "stop", "seed", "tools", "tool_choice")
# Accepted only at their default value (what SDKs send unasked); anything else is a 400.
_DEFAULTS: dict[str, tuple[object, ...]] = {
    "n": (1, None),
    "logprobs": (False, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "parallel_tool_calls": (True, None),
    "store": (False, None),
    "top_logprobs": (None, 0),
    "logit_bias": (None,),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "modalities": (None, ["text"]),
}
# Accepted and not forwarded: metadata about the end user, for the provider's abuse monitoring.
_IGNORED = frozenset({"user", "metadata", "safety_identifier", "prompt_cache_key"})
_KNOWN = frozenset(_PASSED) | _DEFAULTS.keys() | _IGNORED | {"stream", "stream_options", "max_completion_tokens", "response_format"}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    start: pb.ClientFrame
    model: str
    stream: bool
    include_usage: bool


def _clean_message(m: object) -> object:
    """OpenAI messages as SDKs send them: `null` fields dropped, `developer` read as `system`,
    and an assistant's `refusal: null`."""
    if not isinstance(m, dict):
        return m
    out = {k: v for k, v in m.items() if v is not None and k != "refusal"}
    if out.get("role") == "developer":
        out["role"] = "system"
    if out.get("role") == "assistant" and "content" not in out:
        out["content"] = ""
    return out


def parse_chat_request(body: object, max_bytes: int, max_messages: int) -> ChatRequest:
    """Raises `ApiError` (400) naming the first field it cannot honour."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    unknown = sorted(body.keys() - _KNOWN)
    if unknown:
        raise invalid(f"unsupported field {unknown[0]!r}: llmproxy does not support it", unknown[0])
    for key, allowed in _DEFAULTS.items():
        if key in body and body[key] not in allowed:
            raise invalid(f"unsupported value for {key!r}: only {allowed[0]!r} is supported", key)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise invalid("unsupported value for 'response_format': only {'type': 'text'} is supported", "response_format")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or not options.keys() <= {"include_usage", "include_obfuscation"}:
            raise invalid("stream_options supports include_usage only", "stream_options")
        include_usage = options.get("include_usage") is True
    frame: dict[str, Any] = {"type": "start", "id": STREAM_ID}
    for key in _PASSED:
        if key in body and body[key] is not None:
            frame[key] = body[key]
    if body.get("max_completion_tokens") is not None:
        frame["max_tokens"] = body["max_completion_tokens"]
    if isinstance(frame.get("messages"), list):
        frame["messages"] = [_clean_message(m) for m in frame["messages"]]
    if isinstance(frame.get("tools"), list):
        frame["tools"] = [
            {**t, "function": {k: v for k, v in t["function"].items() if k != "strict"}}
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
            else t
            for t in frame["tools"]
        ]
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise invalid("model is required", "model")
    try:
        start = decode_client_frame(orjson.dumps(frame).decode(), max_bytes, max_messages)
    except FrameError as exc:
        raise invalid(exc.message) from None
    if not start.start.messages:
        raise invalid("messages must hold at least one message", "messages")
    return ChatRequest(start, body["model"], bool(stream), include_usage)


# -- response ---------------------------------------------------------------------------------

FINISH: dict[int, str] = {
    pb.FINISH_REASON_UNSPECIFIED: "stop",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
    pb.FINISH_REASON_CANCELLED: "stop",
}

HEARTBEAT = b": heartbeat\n\n"
DONE = b"data: [DONE]\n\n"


def usage_dict(u: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},  # the provider's prompt cache
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def sse_data(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class ChatEncoder:
    """One chat completion: feed frames, get SSE bytes (stream) or, at the end, one body."""

    def __init__(self, model: str, include_usage: bool, created: int | None = None) -> None:
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.include_usage = include_usage
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self.finished: dict[str, Any] | None = None  # the whole completion, once done
        # The hot path: a token chunk is this prefix, the text as a JSON string, this suffix
        # (the same bytes `_chunk` would make; tests/unit/bridge/test_http_translators.py).
        head = orjson.dumps(
            {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model, "system_fingerprint": None}
        )
        self._token_head = b"data: " + head[:-1] + b',"choices":[{"index":0,"delta":{"content":'
        self._token_tail = b'},"logprobs":null,"finish_reason":null}]' + (b',"usage":null' if include_usage else b"") + b"}\n\n"

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, usage: object = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage or usage is not None:
            obj["usage"] = usage
        return sse_data(obj)

    def stream_frame(self, frame: pb.ServerFrame) -> bytes:
        """The SSE bytes of one frame (b"" for frames with nothing to say). An `error` frame
        is `api_error`'s job: the caller decides between a status and an in-stream event."""
        kind = frame.WhichOneof("kind")
        if kind == "token":
            text = frame.token.text
            self._text.append(text)
            return self._token_head + orjson.dumps(text) + self._token_tail
        if kind == "tool_call":
            return self._chunk({"tool_calls": [self._tool_call(frame.tool_call)]})
        if kind == "reasoning":
            self._reasoning.append(frame.reasoning.text)
            return self._chunk({"reasoning_content": frame.reasoning.text})
        if kind == "started":
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "heartbeat":
            return HEARTBEAT
        if kind == "done":
            done = frame.done
            finish = FINISH[done.finish_reason]
            usage = usage_dict(done.usage)
            self.finished = self.completion(finish, usage)
            if self.include_usage:
                last = {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage,
                }
                return self._chunk({}, finish) + sse_data(last) + DONE
            return self._chunk({}, finish, usage) + DONE
        return b""

    def stream_error(self, error: ApiError) -> bytes:
        return stream_error_event(error)

    def collect_frame(self, frame: pb.ServerFrame) -> None:
        """Non-streaming: gathers the answer; `finished` is set by `done`."""
        kind = frame.WhichOneof("kind")
        if kind == "token":
            self._text.append(frame.token.text)
        elif kind == "tool_call":
            self._tool_call(frame.tool_call)
        elif kind == "reasoning":
            self._reasoning.append(frame.reasoning.text)
        elif kind == "done":
            self.finished = self.completion(FINISH[frame.done.finish_reason], usage_dict(frame.done.usage))

    def _tool_call(self, c: pb.ToolCallDelta) -> dict[str, Any]:
        call = self._calls.get(c.index)
        if call is None:
            call = self._calls[c.index] = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            return {"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        call["function"]["arguments"] += c.arguments
        return {"index": c.index, "function": {"arguments": c.arguments}}

    def completion(self, finish: str, usage: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self._text) if self._text or not self._calls else None, "refusal": None}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._calls:
            message["tool_calls"] = [self._calls[i] for i in sorted(self._calls)]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }


def stream_error_event(error: ApiError) -> bytes:
    """A mid-stream error: openai-python raises `APIError` on any event with an `error` key."""
    return sse_data(error_body(error))


def models_list(response: pb.ListModelsResponse, created: int = 0) -> dict[str, Any]:
    return {"object": "list", "data": [model_entry(m.name, created) for m in response.models]}


def model_entry(name: str, created: int = 0) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "llmproxy"}
