"""OpenAI Responses API (a subset) over the relay: a request body -> a `start` frame, server frames
-> the Responses event stream. Sans-I/O; bridge/http_api.py drives it.

The subset: text and function calls, in and out (what the Vercel AI SDK's `openai(model)` and
openai-python's `client.responses` use for chat). `input` items are rewritten into the
OpenAI-shaped messages every other path uses (`instructions` and system/developer items as
system messages, `function_call` items as an assistant's tool calls, `function_call_output`
items as `tool` messages). Anything else (stored state: `previous_response_id`,
`conversation`, `store: true`, item references; built-in tools; images; structured output) is a
400 naming the field: never a silent drop.

The event stream, each event with `event:` its type and a `sequence_number` counting from 0:

    started     response.created, response.in_progress
    token       (first of a text item) response.output_item.added {message},
                response.content_part.added; then response.output_text.delta
    tool_call   (new call) the open item's *.done events, response.output_item.added
                {function_call}; then response.function_call_arguments.delta
    reasoning   response.output_item.added {reasoning}, response.reasoning_summary_part.added,
                response.reasoning_summary_text.delta
    heartbeat   an SSE comment
    done        the open item's *.done events, then response.completed (response.incomplete
                for max_output_tokens / content_filter) with the output and usage
    error       `error` (code, message; also nested under `error` for readers that look there)
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from llmproxy.v1 import llmproxy_pb2 as pb
from bridge.codec import FrameError, decode_client_frame
from bridge.openai_chat import HEARTBEAT, STREAM_ID, ApiError, invalid

_PASSED = frozenset({"model", "input", "instructions", "stream", "temperature", "top_p", "max_output_tokens", "tools", "tool_choice"})
# Accepted only at their default value; anything else is a 400 naming the field.
_DEFAULTS: dict[str, tuple[object, ...]] = {
    "parallel_tool_calls": (None, True),
    "store": (None, False),
    "include": (None, []),
    "truncation": (None, "disabled"),
    "service_tier": (None, "auto", "default"),
    "top_logprobs": (None, 0),
    "background": (None, False),
    "previous_response_id": (None,),
    "conversation": (None,),
    "reasoning": (None,),
    "max_tool_calls": (None,),
    "prompt": (None,),
}
_IGNORED = frozenset({"user", "metadata", "safety_identifier", "prompt_cache_key", "stream_options"})


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    start: pb.ClientFrame
    model: str
    stream: bool


def _text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", where)
    texts = []
    for i, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text") and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else None
            raise invalid(f"{where}[{i}]: unsupported content part {kind!r}; only text is supported", f"{where}[{i}]")
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid("instructions must be a string", "instructions")
        out.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise invalid("input must be a string or a non-empty list of items", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"{where}.role must be user, assistant, system or developer", f"{where}.role")
            out.append({"role": "system" if role == "developer" else role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and (not last["content"] or "tool_calls" in last):
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(output, f"{where}.output")})
        else:
            raise invalid(f"{where}: unsupported input item type {kind!r}", f"{where}.type")
    return out


def parse_responses_request(body: object, max_bytes: int, max_messages: int) -> ResponsesRequest:
    """Raises `ApiError` (400) naming the first field it cannot honour."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    unknown = sorted(body.keys() - _PASSED - _DEFAULTS.keys() - _IGNORED - {"text"})
    if unknown:
        raise invalid(f"unsupported field {unknown[0]!r}: llmproxy does not support it", unknown[0])
    for key, allowed in _DEFAULTS.items():
        if key in body and body[key] not in allowed:
            raise invalid(f"unsupported value for {key!r}: llmproxy does not support it", key)
    text = body.get("text")
    if text is not None and text not in ({}, {"format": {"type": "text"}}):
        raise invalid("unsupported value for 'text': only plain text output is supported", "text")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required", "model")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    frame: dict[str, Any] = {"type": "start", "id": STREAM_ID, "model": model, "messages": _messages(body)}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("max_tokens", "max_output_tokens")):
        if body.get(theirs) is not None:
            frame[ours] = body[theirs]
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools must be a list", "tools")
        frame["tools"] = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                kind = t.get("type") if isinstance(t, dict) else None
                raise invalid(f"tools[{i}]: unsupported tool type {kind!r}; only function tools are supported", f"tools[{i}].type")
            fn = {"name": t.get("name"), "description": t.get("description") or "", "parameters": t.get("parameters") or {}}
            frame["tools"].append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    if choice is not None:
        if isinstance(choice, str):
            frame["tool_choice"] = choice
        elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
            frame["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            raise invalid("tool_choice must be auto, none, required or {type: function, name}", "tool_choice")
    try:
        start = decode_client_frame(orjson.dumps(frame).decode(), max_bytes, max_messages)
    except FrameError as exc:
        raise invalid(exc.message) from None
    return ResponsesRequest(start, model, bool(stream))


def error_event_body(error: ApiError, sequence_number: int) -> dict[str, Any]:
    return {
        "type": "error",
        "sequence_number": sequence_number,
        "code": error.code,
        "message": error.message,
        "param": error.param,
        "error": {"type": error.type, "code": error.code, "message": error.message, "param": error.param},
    }


class ResponsesEncoder:
    """One response: feed frames, get the Responses event stream, or at the end one body."""

    def __init__(self, model: str, created_at: int | None = None) -> None:
        self.id = "resp_" + secrets.token_hex(12)
        self.model = model
        self.created_at = int(time.time()) if created_at is None else created_at
        self.sequence_number = 0
        self.output: list[dict[str, Any]] = []  # items as they stand
        self._open: dict[str, Any] | None = None  # the item still streaming
        self._open_key = ""  # "text", "reasoning" or "call:<index>"
        self.finished: dict[str, Any] | None = None

    def _event(self, obj: dict[str, Any]) -> bytes:
        obj["sequence_number"] = self.sequence_number
        self.sequence_number += 1
        kind: str = obj["type"]
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

    def stream_error(self, error: ApiError) -> bytes:
        body = error_event_body(error, self.sequence_number)
        self.sequence_number += 1
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"

    def _response(self, status: str, usage: dict[str, Any] | None = None, incomplete: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": self.output if status != "in_progress" else [],
            "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "usage": usage,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }

    def _index(self) -> int:
        return len(self.output) - 1

    def _switch(self, key: str, out: list[bytes], item: dict[str, Any]) -> dict[str, Any]:
        if self._open is not None and self._open_key == key:
            return self._open
        self._close(out)
        self.output.append(item)
        self._open, self._open_key = item, key
        out.append(self._event({"type": "response.output_item.added", "output_index": self._index(), "item": _snapshot(item)}))
        if item["type"] == "message":
            out.append(self._event({"type": "response.content_part.added", "item_id": item["id"], "output_index": self._index(),
                                    "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}))
        elif item["type"] == "reasoning":
            out.append(self._event({"type": "response.reasoning_summary_part.added", "item_id": item["id"], "output_index": self._index(),
                                    "summary_index": 0, "part": {"type": "summary_text", "text": ""}}))
        return item

    def _close(self, out: list[bytes]) -> None:
        item = self._open
        if item is None:
            return
        i = self._index()
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self._event({"type": "response.output_text.done", "item_id": item["id"], "output_index": i, "content_index": 0, "text": part["text"]}))
            out.append(self._event({"type": "response.content_part.done", "item_id": item["id"], "output_index": i, "content_index": 0, "part": part}))
        elif item["type"] == "function_call":
            out.append(self._event({"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": i, "arguments": item["arguments"]}))
        elif item["type"] == "reasoning":
            part = item["summary"][0]
            out.append(self._event({"type": "response.reasoning_summary_text.done", "item_id": item["id"], "output_index": i, "summary_index": 0, "text": part["text"]}))
            out.append(self._event({"type": "response.reasoning_summary_part.done", "item_id": item["id"], "output_index": i, "summary_index": 0, "part": part}))
        item["status"] = "completed"
        out.append(self._event({"type": "response.output_item.done", "output_index": i, "item": item}))
        self._open, self._open_key = None, ""

    def stream_frame(self, frame: pb.ServerFrame) -> bytes:
        out: list[bytes] = []
        kind = frame.WhichOneof("kind")
        if kind == "token":
            text = frame.token.text
            item = self._switch("text", out, {"id": "msg_" + secrets.token_hex(12), "type": "message", "status": "in_progress", "role": "assistant",
                                              "content": [{"type": "output_text", "text": "", "annotations": []}]})
            item["content"][0]["text"] += text
            out.append(self._event({"type": "response.output_text.delta", "item_id": item["id"], "output_index": self._index(),
                                    "content_index": 0, "delta": text, "logprobs": []}))
        elif kind == "tool_call":
            c = frame.tool_call
            item = self._switch(f"call:{c.index}", out, {"id": "fc_" + secrets.token_hex(12), "type": "function_call", "status": "in_progress",
                                                         "call_id": c.id, "name": c.name, "arguments": ""})
            if c.arguments:
                item["arguments"] += c.arguments
                out.append(self._event({"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": self._index(),
                                        "delta": c.arguments}))
        elif kind == "reasoning":
            text = frame.reasoning.text
            item = self._switch("reasoning", out, {"id": "rs_" + secrets.token_hex(12), "type": "reasoning", "status": "in_progress",
                                                   "summary": [{"type": "summary_text", "text": ""}]})
            item["summary"][0]["text"] += text
            out.append(self._event({"type": "response.reasoning_summary_text.delta", "item_id": item["id"], "output_index": self._index(),
                                    "summary_index": 0, "delta": text}))
        elif kind == "started":
            out.append(self._event({"type": "response.created", "response": self._response("in_progress")}))
            out.append(self._event({"type": "response.in_progress", "response": self._response("in_progress")}))
        elif kind == "heartbeat":
            out.append(HEARTBEAT)
        elif kind == "done":
            done = frame.done
            self._close(out)
            u = done.usage
            usage = {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_input_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            }
            incomplete = {pb.FINISH_REASON_LENGTH: "max_output_tokens", pb.FINISH_REASON_CONTENT_FILTER: "content_filter"}.get(done.finish_reason)
            response = self._response("incomplete" if incomplete else "completed", usage, incomplete)
            out.append(self._event({"type": "response.incomplete" if incomplete else "response.completed", "response": response}))
            self.finished = response
        return b"".join(out)

    def collect_frame(self, frame: pb.ServerFrame) -> None:
        self.stream_frame(frame)


def _snapshot(item: dict[str, Any]) -> dict[str, Any]:
    """An item as `output_item.added` shows it: empty so far."""
    if item["type"] == "message":
        return {**item, "content": []}
    if item["type"] == "reasoning":
        return {**item, "summary": []}
    return dict(item)
