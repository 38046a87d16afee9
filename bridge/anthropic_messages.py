"""Anthropic Messages over the relay: a request body -> a `start` frame, server frames ->
Anthropic's events. Sans-I/O; bridge/http_api.py drives it.

The request is rewritten into the OpenAI-shaped messages every other path uses (`system` first,
`tool_use` blocks as an assistant's tool calls, `tool_result` blocks as `tool` messages) and
decoded by the same codec; a field we cannot honour is a 400 naming it.

The event stream is Anthropic's, in its order:

    started    message_start (usage so far: 0), ping
    token      content_block_start {text} when a text block is not open, content_block_delta text_delta
    reasoning  ... {thinking}, thinking_delta
    tool_call  content_block_start {tool_use, input: {}} for a new call, input_json_delta
    heartbeat  ping (Anthropic's own keep-alive event)
    done       content_block_stop, message_delta (stop_reason, usage), message_stop
    error      event: error {"type": "error", "error": {...}}

The answer's blocks are kept as they stream, so `stream: false` returns the same message whole.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from llmproxy.v1 import llmproxy_pb2 as pb
from bridge.codec import FrameError, decode_client_frame
from bridge.openai_chat import STREAM_ID, ApiError

_KNOWN = frozenset(
    {"model", "messages", "system", "max_tokens", "temperature", "top_p", "stop_sequences", "stream", "tools", "tool_choice", "metadata"}
)
# Accepted only at their default (what SDKs may send unasked).
_DEFAULTS: dict[str, tuple[object, ...]] = {"top_k": (None,), "thinking": (None, {"type": "disabled"}), "service_tier": (None, "auto")}

STOP_REASON: dict[int, str] = {
    pb.FINISH_REASON_UNSPECIFIED: "end_turn",
    pb.FINISH_REASON_STOP: "end_turn",
    pb.FINISH_REASON_LENGTH: "max_tokens",
    pb.FINISH_REASON_TOOL_CALLS: "tool_use",
    pb.FINISH_REASON_CONTENT_FILTER: "refusal",
    pb.FINISH_REASON_CANCELLED: "end_turn",
}
# HTTP status -> Anthropic's error type (https://docs.anthropic.com/en/api/errors)
ERROR_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", None, message)


def error_body(error: ApiError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPE.get(error.status, "api_error"), "message": error.message}}


def event(name: str, obj: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def stream_error_event(error: ApiError) -> bytes:
    return event("error", error_body(error))


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    start: pb.ClientFrame
    model: str
    stream: bool


def _text_of(blocks: object, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise invalid(f"{where} must be a string or a list of content blocks")
    texts = []
    for i, b in enumerate(blocks):
        if not (isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)):
            raise invalid(f"{where}[{i}]: only text blocks are supported here")
        texts.append(b["text"])
    return "".join(texts)


def _marked(blocks: object) -> bool:
    """Whether a content block list carries a prompt-cache breakpoint (`cache_control`): it is
    passed on as one after that message (docs/caching.md)."""
    return isinstance(blocks, list) and any(isinstance(b, dict) and "cache_control" in b for b in blocks)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text_of(system, "system")})
        if _marked(system):
            out[-1]["cache_control"] = {"type": "ephemeral"}
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise invalid(f"messages[{i}].role must be user or assistant")
        role, content = m["role"], m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise invalid(f"messages[{i}].content must be a string or a list of content blocks")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, b in enumerate(content):
            kind = b.get("type") if isinstance(b, dict) else None
            where = f"messages[{i}].content[{j}]"
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif kind == "tool_use" and role == "assistant" and isinstance(b.get("id"), str) and isinstance(b.get("name"), str):
                arguments = orjson.dumps(b.get("input", {})).decode()
                calls.append({"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": arguments}})
            elif kind == "tool_result" and role == "user" and isinstance(b.get("tool_use_id"), str):
                result = b.get("content", "")
                results.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": _text_of(result, where + ".content")})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # earlier reasoning is not sent back to the model
            else:
                raise invalid(f"{where}: unsupported content block type {kind!r}")
        out.extend(results)
        if texts or calls or not results:
            msg: dict[str, Any] = {"role": role, "content": "".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        if _marked(content):
            out[-1]["cache_control"] = {"type": "ephemeral"}
    return out


def parse_messages_request(body: object, max_bytes: int, max_messages: int) -> MessagesRequest:
    """Raises `ApiError` (400) naming the first field it cannot honour."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    unknown = sorted(body.keys() - _KNOWN - _DEFAULTS.keys())
    if unknown:
        raise invalid(f"unsupported field {unknown[0]!r}: llmproxy does not support it")
    for key, allowed in _DEFAULTS.items():
        if key in body and body[key] not in allowed:
            raise invalid(f"unsupported value for {key!r}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: field required")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be true or false")
    frame: dict[str, Any] = {"type": "start", "id": STREAM_ID, "model": model, "messages": _messages(body)}
    for ours, theirs in (("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"), ("stop", "stop_sequences")):
        if body.get(theirs) is not None:
            frame[ours] = body[theirs]
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools must be a list")
        frame["tools"] = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type", "custom") != "custom":
                raise invalid(f"tools[{i}]: only custom (client) tools are supported")
            frame["tools"].append(
                {"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""), "parameters": t.get("input_schema", {})}}
            )
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "auto" or kind == "none":
            frame["tool_choice"] = kind
        elif kind == "any":
            frame["tool_choice"] = "required"
        elif kind == "tool" and isinstance(choice.get("name"), str):
            frame["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            raise invalid("tool_choice must be {type: auto|any|none|tool}")
    try:
        start = decode_client_frame(orjson.dumps(frame).decode(), max_bytes, max_messages)
    except FrameError as exc:
        raise invalid(exc.message) from None
    return MessagesRequest(start, model, stream)


class MessagesEncoder:
    """One message: feed frames, get Anthropic's SSE events, or at the end one body."""

    def __init__(self, model: str) -> None:
        self.id = "msg_" + secrets.token_hex(12)
        self.model = model
        self.blocks: list[dict[str, Any]] = []  # the answer's content blocks as they stand
        self._open: int | None = None  # index of the block still open
        self._open_kind = ""  # "text", "thinking" or "tool:<call index>"
        self.finished: dict[str, Any] | None = None

    def _message(self, stop_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.blocks if stop_reason is not None else [],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }

    def _switch(self, kind: str, block: dict[str, Any], out: list[bytes]) -> int:
        """Makes the block of `kind` the open one (closing the previous); returns its index."""
        if self._open is not None and self._open_kind == kind:
            return self._open
        self._close(out)
        self._open = len(self.blocks)
        self._open_kind = kind
        self.blocks.append(block)
        start = {k: v for k, v in block.items() if not k.startswith("_")}
        if block["type"] == "tool_use":
            start["input"] = {}
        out.append(event("content_block_start", {"type": "content_block_start", "index": self._open, "content_block": start}))
        return self._open

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": self._open}))
            block = self.blocks[self._open]
            if block["type"] == "tool_use":
                raw = block.pop("_json", "")
                block["input"] = orjson.loads(raw) if raw else {}
            self._open = None
            self._open_kind = ""

    def stream_frame(self, frame: pb.ServerFrame) -> bytes:
        out: list[bytes] = []
        kind = frame.WhichOneof("kind")
        if kind == "token":
            text = frame.token.text
            i = self._switch("text", {"type": "text", "text": ""}, out)
            self.blocks[i]["text"] += text
            out.append(event("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": text}}))
        elif kind == "reasoning":
            text = frame.reasoning.text
            i = self._switch("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
            self.blocks[i]["thinking"] += text
            out.append(
                event("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {"type": "thinking_delta", "thinking": text}})
            )
        elif kind == "tool_call":
            c = frame.tool_call
            i = self._switch(f"tool:{c.index}", {"type": "tool_use", "id": c.id, "name": c.name, "_json": ""}, out)
            if c.arguments:
                self.blocks[i]["_json"] += c.arguments
                out.append(
                    event(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": c.arguments}},
                    )
                )
        elif kind == "started":
            out.append(event("message_start", {"type": "message_start", "message": self._message(None, {"input_tokens": 0, "output_tokens": 0})}))
            out.append(event("ping", {"type": "ping"}))
        elif kind == "heartbeat":
            out.append(event("ping", {"type": "ping"}))
        elif kind == "done":
            done = frame.done
            self._close(out)
            u = done.usage
            usage = {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens}
            if u.cached_input_tokens or u.cache_write_input_tokens:  # Anthropic's input_tokens excludes both
                usage["input_tokens"] = max(u.prompt_tokens - u.cached_input_tokens - u.cache_write_input_tokens, 0)
                usage["cache_read_input_tokens"] = u.cached_input_tokens
                usage["cache_creation_input_tokens"] = u.cache_write_input_tokens
            stop = STOP_REASON[done.finish_reason]
            out.append(
                event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": usage})
            )
            out.append(event("message_stop", {"type": "message_stop"}))
            self.finished = self._message(stop, usage)
        return b"".join(out)

    def collect_frame(self, frame: pb.ServerFrame) -> None:
        self.stream_frame(frame)

    def stream_error(self, error: ApiError) -> bytes:
        return stream_error_event(error)
