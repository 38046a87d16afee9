"""Requests and conversation histories as JSON for the shared store (never pickle: what is read
back from Redis is data, not code)."""

from __future__ import annotations

from typing import Any

import orjson

from server.core.request import ChatMessage, ChatRequest, ToolCall, ToolSpec


def message_to_dict(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [[c.id, c.name, c.arguments] for c in m.tool_calls]
    if m.cache_breakpoint:
        out["cache_breakpoint"] = True
    return out


def message_from_dict(d: dict[str, Any]) -> ChatMessage:
    return ChatMessage(
        role=str(d["role"]),
        content=str(d["content"]),
        name=str(d.get("name", "")),
        tool_call_id=str(d.get("tool_call_id", "")),
        tool_calls=tuple(ToolCall(str(i), str(n), str(a)) for i, n, a in d.get("tool_calls", ())),
        cache_breakpoint=bool(d.get("cache_breakpoint", False)),
    )


def dump_messages(messages: list[ChatMessage] | tuple[ChatMessage, ...]) -> bytes:
    return orjson.dumps([message_to_dict(m) for m in messages])


def load_messages(data: bytes) -> list[ChatMessage]:
    return [message_from_dict(d) for d in orjson.loads(data)]


def dump_request(r: ChatRequest, conversation: str) -> bytes:
    return orjson.dumps(
        {
            "model": r.model,
            "messages": [message_to_dict(m) for m in r.messages],
            "temperature": r.temperature,
            "top_p": r.top_p,
            "max_tokens": r.max_tokens,
            "stop": list(r.stop),
            "seed": r.seed,
            "tools": [[t.name, t.description, t.parameters_json] for t in r.tools],
            "tool_choice": r.tool_choice,
            "conversation": conversation,
        }
    )


def load_request(data: bytes) -> tuple[ChatRequest, str]:
    """The request and the conversation it belongs to."""
    d = orjson.loads(data)
    request = ChatRequest(
        model=str(d["model"]),
        messages=tuple(message_from_dict(m) for m in d["messages"]),
        temperature=d.get("temperature"),
        top_p=d.get("top_p"),
        max_tokens=d.get("max_tokens"),
        stop=tuple(d.get("stop", ())),
        seed=d.get("seed"),
        tools=tuple(ToolSpec(str(n), str(desc), str(p)) for n, desc, p in d.get("tools", ())),
        tool_choice=str(d.get("tool_choice", "")),
    )
    return request, str(d.get("conversation", ""))
