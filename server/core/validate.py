"""Turns proto request messages into the unified `ChatRequest`, validating every field.

Each problem is an `InvalidRequest` (or `UnknownModel`) naming the field, so the client learns
exactly what to fix. Pure functions; no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Container, Iterable

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.request import ROLES, ChatMessage, ChatRequest, ToolCall, ToolSpec
from server.core.session_limits import SessionLimits
from server.errors import InvalidRequest, UnknownModel


def to_messages(messages: Iterable[pb.ChatMessage], limits: SessionLimits, field: str = "messages") -> list[ChatMessage]:
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"{field}[{i}].role must be one of {', '.join(sorted(ROLES))}")
        if len(m.content) > limits.max_message_chars:
            raise InvalidRequest(f"{field}[{i}].content is longer than {limits.max_message_chars} characters")
        out.append(
            ChatMessage(
                role=m.role,
                content=m.content,
                name=m.name,
                tool_call_id=m.tool_call_id,
                tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
                cache_breakpoint=m.cache_breakpoint,
            )
        )
        if len(out) > limits.max_messages:
            raise InvalidRequest(f"at most {limits.max_messages} messages per request")
    return out


def to_request(start: pb.StartStream, limits: SessionLimits, known_models: Container[str]) -> ChatRequest:
    """Validates a start frame; raises `InvalidRequest` or `UnknownModel`."""
    if not start.model:
        raise InvalidRequest("model is required")
    if start.model not in known_models:
        raise UnknownModel(f"unknown model {start.model!r}; ListModels gives the served names")
    if not start.messages:
        raise InvalidRequest("messages must hold at least one message")
    messages = to_messages(start.messages, limits)
    p = start.params
    temperature = p.temperature if p.HasField("temperature") else None
    top_p = p.top_p if p.HasField("top_p") else None
    max_tokens = p.max_tokens if p.HasField("max_tokens") else None
    if temperature is not None and not (0.0 <= temperature <= 2.0 and math.isfinite(temperature)):
        raise InvalidRequest("temperature must be between 0 and 2")
    if top_p is not None and not (0.0 <= top_p <= 1.0 and math.isfinite(top_p)):
        raise InvalidRequest("top_p must be between 0 and 1")
    if max_tokens is not None and not (1 <= max_tokens <= limits.max_tokens_cap):
        raise InvalidRequest(f"max_tokens must be between 1 and {limits.max_tokens_cap}")
    if len(p.stop) > limits.max_stop_sequences or any(not s for s in p.stop):
        raise InvalidRequest(f"stop takes at most {limits.max_stop_sequences} non-empty strings")
    if any(len(s) > limits.max_stop_chars for s in p.stop):
        raise InvalidRequest(f"each stop sequence is at most {limits.max_stop_chars} characters")
    if len(start.tools) > limits.max_tools:
        raise InvalidRequest(f"at most {limits.max_tools} tools per request")
    tools = []
    for i, t in enumerate(start.tools):
        if not t.name:
            raise InvalidRequest(f"tools[{i}] needs a name")
        try:
            schema = json.loads(t.parameters_json or "{}")
        except ValueError:
            raise InvalidRequest(f"tools[{i}].parameters is not valid JSON") from None
        except RecursionError:  # nested deeper than the parser's own stack allows
            schema = None
        if schema is None or json_depth(schema) > limits.max_json_depth:
            raise InvalidRequest(f"tools[{i}].parameters nests deeper than {limits.max_json_depth} levels")
        if not isinstance(schema, dict):
            raise InvalidRequest(f"tools[{i}].parameters must be a JSON object")
        tools.append(ToolSpec(t.name, t.description, t.parameters_json or "{}"))
    choice = start.tool_choice
    if choice and choice not in ("auto", "none", "required") and choice not in {t.name for t in tools}:
        raise InvalidRequest("tool_choice must be auto, none, required or the name of a given tool")
    if len(start.conversation) > limits.max_stream_id_chars:
        raise InvalidRequest(f"conversation names are at most {limits.max_stream_id_chars} characters")
    return ChatRequest(
        model=start.model,
        messages=tuple(messages),
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        stop=tuple(p.stop),
        seed=p.seed if p.HasField("seed") else None,
        tools=tuple(tools),
        tool_choice=choice,
    )


def json_depth(value: object) -> int:
    """How deeply a parsed JSON value nests (a scalar is 0, `{}` 1), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest
