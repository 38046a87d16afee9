"""Anthropic adapter: request mapping, stream decoding, error classification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.core.events import Finished, FinishReason, ReasoningDelta, TextDelta, ToolCallDelta, UsageReport
from server.core.request import ChatMessage, ChatRequest, ToolCall, ToolSpec
from server.errors import (
    InvalidRequest,
    MalformedStream,
    Overloaded,
    RateLimited,
    StreamCut,
    UpstreamInvalidRequest,
    UpstreamServerError,
    UpstreamUnauthenticated,
)
from server.providers.adapter import Endpoint, Secret
from server.providers.anthropic import DEFAULT_MAX_TOKENS, AnthropicAdapter
from server.providers.sse import SSEDecoder, SSEEvent

FIXTURES = Path(__file__).resolve().parents[2] / "fakes" / "fixtures"
ADAPTER = AnthropicAdapter()
ENDPOINT = Endpoint("anthropic", "claude-sonnet-4-5", "https://api.anthropic.com/v1", Secret("ak"))
TOOL = ToolSpec("get_weather", "Weather", '{"type": "object"}')


def body_of(request):
    http = ADAPTER.build_request(request, ENDPOINT)
    return http, json.loads(http.content)


def test_build_maps_system_tools_and_merges_turns():
    request = ChatRequest(
        "pub",
        (
            ChatMessage("system", "Be brief."),
            ChatMessage("system", "Be kind."),
            ChatMessage("user", "Weather in Paris and Rome?"),
            ChatMessage("assistant", "Checking.", tool_calls=(ToolCall("t1", "get_weather", '{"city": "Paris"}'),
                                                            ToolCall("t2", "get_weather", '{"city": "Rome"}'))),
            ChatMessage("tool", "21", tool_call_id="t1"),
            ChatMessage("tool", "25", tool_call_id="t2"),
            ChatMessage("user", "Thanks"),
        ),
        temperature=0.5, top_p=0.9, stop=("END",), tools=(TOOL,), tool_choice="required",
    )
    http, body = body_of(request)
    assert str(http.url) == "https://api.anthropic.com/v1/messages"
    assert http.headers["x-api-key"] == "ak" and http.headers["anthropic-version"] == "2023-06-01"
    assert body["system"] == "Be brief.\n\nBe kind."
    assert [t["role"] for t in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"][1] == {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "t1", "content": "21"},
        {"type": "tool_result", "tool_use_id": "t2", "content": "25"},
        {"type": "text", "text": "Thanks"},
    ]
    assert body["max_tokens"] == DEFAULT_MAX_TOKENS and body["stream"] is True
    assert (body["temperature"], body["top_p"], body["stop_sequences"]) == (0.5, 0.9, ["END"])
    assert body["tools"] == [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}]
    assert body["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize(
    "request_",
    [
        ChatRequest("p", (ChatMessage("user", "x"),), seed=1),
        ChatRequest("p", (ChatMessage("user", "x"),), temperature=1.5),
        ChatRequest("p", (ChatMessage("user", "x", name="ann"),)),
        ChatRequest("p", (ChatMessage("user", "x"), ChatMessage("system", "late"))),
        ChatRequest("p", (ChatMessage("user", "x"),), tool_choice="auto"),
    ],
)
def test_unhonourable_requests_are_invalid(request_):
    with pytest.raises(InvalidRequest):
        ADAPTER.build_request(request_, ENDPOINT)


def decode(data: bytes):
    sse, decoder, events = SSEDecoder(), ADAPTER.new_decoder(), []
    for sse_event in sse.decode(data) + sse.flush():
        events += decoder.feed(sse_event)
    return decoder, events


def test_decode_recorded_basic_stream_without_trailing_newline():
    _, events = decode((FIXTURES / "anthropic_basic.sse").read_bytes())
    assert events == [UsageReport(prompt_tokens=11), TextDelta("Hello"), TextDelta(" there"), TextDelta("!"),
                      UsageReport(completion_tokens=6), Finished(FinishReason.STOP)]


def test_decode_recorded_tool_use_stream():
    _, events = decode((FIXTURES / "anthropic_tool_use.sse").read_bytes())
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert calls[0] == ToolCallDelta(0, "toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather", "")
    assert "".join(c.arguments for c in calls) == '{"location": "Paris"}'
    assert events[-1] == Finished(FinishReason.TOOL_CALLS)


def event(name, payload):
    return SSEEvent(json.dumps(payload), name)


def test_thinking_and_unknown_events():
    decoder = ADAPTER.new_decoder()
    assert decoder.feed(event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}})) == []
    assert decoder.feed(event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me"}})) == [ReasoningDelta("Let me")]
    assert decoder.feed(event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "abc"}})) == []
    assert decoder.feed(event("some_future_event", {"type": "some_future_event"})) == []
    assert decoder.feed(event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 3}})) == [UsageReport(completion_tokens=3)]
    assert decoder.feed(event("message_stop", {"type": "message_stop"})) == [Finished(FinishReason.LENGTH)]


def test_message_delta_with_stop_reason_and_usage_ends_the_answer_without_message_stop():
    decoder = ADAPTER.new_decoder()
    decoder.feed(event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}))
    assert decoder.end() == [Finished(FinishReason.STOP)]
    decoder = ADAPTER.new_decoder()
    decoder.feed(event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}))
    with pytest.raises(StreamCut):  # no stop_reason: cut
        decoder.end()


def test_error_event_and_cut_and_malformed():
    decoder = ADAPTER.new_decoder()
    with pytest.raises(Overloaded):
        decoder.feed(event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    with pytest.raises(StreamCut):
        decoder.end()
    with pytest.raises(MalformedStream):
        decoder.feed(SSEEvent('{"type": "content_block_delta"', "content_block_delta"))
    with pytest.raises(MalformedStream):  # tool input for a block that never started
        decoder.feed(event("content_block_delta", {"type": "content_block_delta", "index": 5, "delta": {"type": "input_json_delta", "partial_json": "{"}}))


@pytest.mark.parametrize(
    ("status", "etype", "headers", "expected", "retry_after"),
    [
        (429, "rate_limit_error", {"retry-after": "9"}, RateLimited, 9.0),
        (529, "overloaded_error", {}, Overloaded, None),
        (503, "api_error", {}, Overloaded, None),
        (500, "api_error", {}, UpstreamServerError, None),
        (401, "authentication_error", {}, UpstreamUnauthenticated, None),
        (403, "permission_error", {}, UpstreamUnauthenticated, None),
        (400, "invalid_request_error", {}, UpstreamInvalidRequest, None),
        (413, "request_too_large", {}, UpstreamInvalidRequest, None),
        (404, "not_found_error", {}, UpstreamInvalidRequest, None),
    ],
)
def test_classify(status, etype, headers, expected, retry_after):
    body = json.dumps({"type": "error", "error": {"type": etype, "message": "m"}}).encode()
    result = ADAPTER.classify_error(status, headers, body)
    assert type(result) is expected and result.provider_type == etype and result.retry_after_s == retry_after
