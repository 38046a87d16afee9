"""Anthropic Messages: the pure adapter.

Wire format (https://docs.anthropic.com/en/api/messages-streaming): `POST {base_url}/messages`
with `"stream": true`, headers `x-api-key` and `anthropic-version: 2023-06-01`. The stream is
SSE with `event:` names: `message_start` (usage.input_tokens), then per content block
`content_block_start` / `content_block_delta` (`text_delta`, `input_json_delta`,
`thinking_delta`, `signature_delta`) / `content_block_stop`, `ping`s anywhere, `message_delta`
(`stop_reason`, cumulative `usage.output_tokens`) and `message_stop`. Unknown event types are
ignored, as the docs ask. An `event: error` carries `{"type": "error", "error": {"type": ...}}`.

Request mapping: leading system messages become the top-level `system`; tool results become
`tool_result` blocks of a user turn and consecutive turns of the same role are merged, since
the API wants user and assistant to alternate. `max_tokens` is required by the API: when the
client sets none we send `DEFAULT_MAX_TOKENS`. `seed`, a participant `name` and a system
message after the conversation started cannot be honoured and are rejected.

Errors (https://docs.anthropic.com/en/api/errors) are classified by status and `error.type`:
`rate_limit_error` 429, `overloaded_error` 529, `api_error` 500, `authentication_error` 401,
`permission_error` 403, `invalid_request_error` 400, `request_too_large` 413. The API has no
structured type for an over-long prompt (it is an `invalid_request_error`), so that reaches the
client as invalid_request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.core.events import (
    Finished,
    FinishReason,
    ProviderEvent,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from server.core.request import ChatRequest
from server.errors import (
    InvalidRequest,
    MalformedStream,
    Overloaded,
    RateLimited,
    StreamCut,
    UpstreamError,
    UpstreamInvalidRequest,
    UpstreamServerError,
    UpstreamUnauthenticated,
)
from server.providers.adapter import (
    Endpoint,
    UpstreamRequest,
    excerpt,
    join_url,
    loads_body,
    loads_event,
    parse_json_arg,
    parse_retry_after,
    post_json,
    redact,
)
from server.providers.sse import SSEEvent

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
PROVIDER = "anthropic"

_FINISH = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "pause_turn": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}


# Anthropic allows at most 4 cache breakpoints per request.
MAX_BREAKPOINTS = 4
_EPHEMERAL = {"type": "ephemeral"}


def build_body(request: ChatRequest, model: str, auto_cache: bool = False) -> dict[str, Any]:
    """The Messages body for `request`; raises `InvalidRequest`."""
    if request.seed is not None:
        raise InvalidRequest("anthropic does not support seed")
    if request.temperature is not None and not 0.0 <= request.temperature <= 1.0:
        raise InvalidRequest("anthropic accepts a temperature between 0 and 1")
    system: list[str] = []
    system_breakpoint = False
    turns: list[dict[str, Any]] = []
    marked: list[dict[str, Any]] = []  # blocks the client marked (cache_control passed through)
    for m in request.messages:
        if m.name:
            raise InvalidRequest("anthropic does not support message names")
        if m.role == "system":
            if turns:
                raise InvalidRequest("anthropic accepts system messages only before the conversation")
            system.append(m.content)
            system_breakpoint = system_breakpoint or m.cache_breakpoint
            continue
        blocks: list[dict[str, Any]] = []
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequest("a tool message needs tool_call_id")
            role = "user"
            blocks.append({"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content})
        else:
            role = m.role
            if m.content:
                blocks.append({"type": "text", "text": m.content})
            for call in m.tool_calls:
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": parse_json_arg(call.arguments, f"the arguments of tool call {call.id!r}"),
                    }
                )
        if m.cache_breakpoint and blocks:
            marked.append(blocks[-1])
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    body: dict[str, Any] = {
        "model": model,
        "messages": turns,
        "max_tokens": request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS,
        "stream": True,
    }
    if system:
        body["system"] = "\n\n".join(system)
        if system_breakpoint or auto_cache:
            body["system"] = [{"type": "text", "text": body["system"]}]
            marked.insert(0, body["system"][0])
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if request.tools:
        body["tools"] = [
            {
                "name": t.name,
                "description": t.description,
                "input_schema": parse_json_arg(t.parameters_json, f"the parameters of tool {t.name!r}"),
            }
            for t in request.tools
        ]
    if request.tool_choice:
        body["tool_choice"] = _tool_choice(request)
    if auto_cache:
        _mark_stable_prefix(body, marked)
    for block in marked[:MAX_BREAKPOINTS]:
        block["cache_control"] = dict(_EPHEMERAL)
    return body


def _mark_stable_prefix(body: dict[str, Any], marked: list[dict[str, Any]]) -> None:
    """Adds breakpoints on what stays the same from one turn of a conversation to the next: the
    tools (the last tool's breakpoint covers all of them), the system prompt (already marked) and
    the earlier turns (the last block before the final user turn), within the limit of 4."""
    if body.get("tools"):
        marked.append(body["tools"][-1])
    turns = body["messages"]
    for turn in reversed(turns[:-1]):
        if turn["content"]:
            marked.append(turn["content"][-1])
            break
    seen: set[int] = set()
    marked[:] = [b for b in marked if not (id(b) in seen or seen.add(id(b)))]  # type: ignore[func-returns-value]


def _tool_choice(request: ChatRequest) -> dict[str, str]:
    choice = request.tool_choice
    if not request.tools:
        raise InvalidRequest("tool_choice needs tools")
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if choice not in {t.name for t in request.tools}:
        raise InvalidRequest(f"tool_choice names no tool of the request: {choice!r}")
    return {"type": "tool", "name": choice}


def classify_error_object(err: Mapping[str, Any], status: int, headers: Mapping[str, str], body: str) -> UpstreamError:
    etype = err.get("type") if isinstance(err.get("type"), str) else ""
    kind = str(etype or "")
    kw: dict[str, Any] = {"status": status, "provider_type": kind, "body": body}
    message = err.get("message")
    detail = f": {redact(message)[:300]}" if isinstance(message, str) and message else ""
    if etype == "overloaded_error" or status in (503, 529):
        return Overloaded("anthropic is overloaded", retry_after_s=parse_retry_after(headers), **kw)
    if etype == "rate_limit_error" or status == 429:
        return RateLimited("anthropic: rate limited", retry_after_s=parse_retry_after(headers), **kw)
    if etype in ("authentication_error", "permission_error") or status in (401, 403):
        return UpstreamUnauthenticated("anthropic refused the server's credentials", **kw)
    if etype in ("invalid_request_error", "not_found_error", "request_too_large") or 400 <= status < 500:
        return UpstreamInvalidRequest(f"anthropic rejected the request (HTTP {status}){detail}", **kw)
    return UpstreamServerError(f"anthropic failed (HTTP {status})" if status else "anthropic failed mid-stream", **kw)


def classify(status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
    payload = loads_body(body)
    err = payload.get("error") if isinstance(payload, dict) else None
    return classify_error_object(err if isinstance(err, dict) else {}, status, headers, excerpt(body))


class MessagesDecoder:
    """Per-stream state of one Messages answer: which content blocks are tool calls."""

    __slots__ = ("_tool_index", "_reason", "_stopped")

    def __init__(self) -> None:
        self._tool_index: dict[int, int] = {}  # content block index -> our tool-call index
        self._reason = FinishReason.STOP
        self._stopped = False  # message_delta carried stop_reason and the final usage

    def feed(self, event: SSEEvent) -> list[ProviderEvent]:
        payload = loads_event(event, PROVIDER)
        if not isinstance(payload, dict):
            raise MalformedStream("anthropic sent an event that is not an object")
        kind = payload.get("type")
        if kind == "content_block_delta":  # the per-token case first
            delta = payload.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = delta.get("text")
                return [TextDelta(text)] if text else []
            if dtype == "input_json_delta":
                fragment = delta.get("partial_json")
                tool = self._tool_index.get(payload.get("index", -1))
                if tool is None:
                    raise MalformedStream("anthropic sent tool input for an unknown content block")
                return [ToolCallDelta(tool, "", "", fragment)] if fragment else []
            if dtype == "thinking_delta":
                thinking = delta.get("thinking")
                return [ReasoningDelta(thinking)] if thinking else []
            return []  # signature_delta, citations_delta, ...
        if kind == "content_block_start":
            block = payload.get("content_block") or {}
            btype = block.get("type")
            if btype == "tool_use":
                tool = len(self._tool_index)
                self._tool_index[payload.get("index", tool)] = tool
                return [ToolCallDelta(tool, block.get("id") or f"toolu_{tool}", block.get("name") or "", "")]
            if btype == "text" and block.get("text"):
                return [TextDelta(block["text"])]
            if btype == "thinking" and block.get("thinking"):
                return [ReasoningDelta(block["thinking"])]
            return []
        if kind == "message_start":
            usage = (payload.get("message") or {}).get("usage") or {}
            prompt = (
                (usage.get("input_tokens") or 0)
                + (usage.get("cache_creation_input_tokens") or 0)
                + (usage.get("cache_read_input_tokens") or 0)
            )
            # prompt caching: input_tokens excludes the cached and the written prefix
            read = usage.get("cache_read_input_tokens") or 0
            written = usage.get("cache_creation_input_tokens") or 0
            return [UsageReport(prompt_tokens=prompt, cached_input_tokens=read, cache_write_input_tokens=written)] if prompt else []
        if kind == "message_delta":
            reason = (payload.get("delta") or {}).get("stop_reason")
            output = (payload.get("usage") or {}).get("output_tokens")
            if reason:
                self._reason = _FINISH.get(reason, FinishReason.STOP)
                self._stopped = output is not None
            return [UsageReport(completion_tokens=output)] if output else []
        if kind == "message_stop":
            return [Finished(self._reason)]
        if kind == "error" or event.event == "error":
            err = payload.get("error")
            raise classify_error_object(err if isinstance(err, dict) else {}, 0, {}, "")
        return []  # ping, content_block_stop, and event types added later

    def end(self) -> list[ProviderEvent]:
        # message_delta with a stop_reason and the final usage ends the answer; a body that
        # ends after it without message_stop is complete, not cut.
        if self._stopped:
            return [Finished(self._reason)]
        raise StreamCut("anthropic's stream ended before message_stop")


class AnthropicAdapter:
    @property
    def name(self) -> str:
        return PROVIDER

    @property
    def default_base_url(self) -> str:
        return "https://api.anthropic.com/v1"

    def build_request(self, request: ChatRequest, endpoint: Endpoint) -> UpstreamRequest:
        body = build_body(request, endpoint.upstream_model, endpoint.prompt_cache)
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            "anthropic-version": API_VERSION,
        }
        if endpoint.key is not None:
            headers["x-api-key"] = endpoint.key.reveal()
        url = join_url(endpoint.base_url or self.default_base_url, "/messages")
        return post_json(url, headers, endpoint, body)

    def new_decoder(self) -> MessagesDecoder:
        return MessagesDecoder()

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
        return classify(status, headers, body)
