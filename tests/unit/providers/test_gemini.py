"""Gemini adapter: request mapping, stream decoding, error classification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.core.events import Finished, FinishReason, ReasoningDelta, TextDelta, ToolCallDelta, UsageReport
from server.core.request import ChatMessage, ChatRequest, ToolCall, ToolSpec
from server.errors import (
    ContentFiltered,
    InvalidRequest,
    MalformedStream,
    Overloaded,
    RateLimited,
    StreamCut,
    UpstreamInvalidRequest,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnauthenticated,
)
from server.providers.adapter import Endpoint, Secret
from server.providers.gemini import GeminiAdapter
from server.providers.sse import SSEDecoder, SSEEvent

FIXTURES = Path(__file__).resolve().parents[2] / "fakes" / "fixtures"
ADAPTER = GeminiAdapter()
ENDPOINT = Endpoint("gemini", "gemini-2.5-flash", "https://generativelanguage.googleapis.com/v1beta", Secret("gk"))
TOOL = ToolSpec("get_weather", "Weather", '{"type": "object", "additionalProperties": false}')


def test_build_maps_roles_system_tools_and_config():
    request = ChatRequest(
        "pub",
        (
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "get_weather", '{"city": "Paris"}'),)),
            ChatMessage("tool", '{"temp": 21}', tool_call_id="c1"),
            ChatMessage("tool", "plain text", tool_call_id="c1"),
            ChatMessage("assistant", "21 degrees."),
        ),
        temperature=0.3, top_p=0.8, max_tokens=64, stop=("END",), seed=5, tools=(TOOL,), tool_choice="get_weather",
    )
    http = ADAPTER.build_request(request, ENDPOINT)
    body = json.loads(http.content)
    assert str(http.url) == "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert http.headers["x-goog-api-key"] == "gk"
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user", "model"]
    assert body["contents"][1]["parts"] == [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]
    assert body["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
        {"functionResponse": {"name": "get_weather", "response": {"result": "plain text"}}},
    ]
    assert body["generationConfig"] == {"temperature": 0.3, "topP": 0.8, "maxOutputTokens": 64, "stopSequences": ["END"], "seed": 5}
    assert body["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"] == {"type": "object", "additionalProperties": False}
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}


@pytest.mark.parametrize(
    "request_",
    [
        ChatRequest("p", (ChatMessage("user", "x", name="ann"),)),
        ChatRequest("p", (ChatMessage("user", "x"), ChatMessage("system", "late"))),
        ChatRequest("p", (ChatMessage("user", "x"), ChatMessage("tool", "r", tool_call_id="unknown"))),
        ChatRequest("p", (ChatMessage("user", "x"),), tool_choice="none"),
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


def test_decode_recorded_basic_stream():
    decoder, events = decode((FIXTURES / "gemini_basic.sse").read_bytes())
    assert [e for e in events if isinstance(e, TextDelta)] == [TextDelta("The"), TextDelta(" capital of Wyoming"), TextDelta(" is **Cheyenne**.\n")]
    # usage is cumulative: only changes are reported
    assert [e for e in events if isinstance(e, UsageReport)] == [UsageReport(7, 0, 0), UsageReport(7, 10, 0)]
    assert decoder.end() == [Finished(FinishReason.STOP)]


def test_decode_recorded_thinking_and_function_call():
    decoder, events = decode((FIXTURES / "gemini_function_call.sse").read_bytes())
    assert isinstance(events[0], ReasoningDelta)
    assert [e for e in events if isinstance(e, ToolCallDelta)] == [ToolCallDelta(0, "call_0", "now", "{}")]
    assert decoder.end() == [Finished(FinishReason.TOOL_CALLS)]


def test_no_finish_reason_is_a_cut():
    data = (FIXTURES / "gemini_basic.sse").read_bytes()
    decoder, _ = decode(data[: data.rindex(b"data:")])
    with pytest.raises(StreamCut):
        decoder.end()


def test_blocked_prompt_and_safety_finish():
    decoder = ADAPTER.new_decoder()
    with pytest.raises(ContentFiltered):
        decoder.feed(SSEEvent(json.dumps({"promptFeedback": {"blockReason": "SAFETY"}})))
    decoder = ADAPTER.new_decoder()
    decoder.feed(SSEEvent(json.dumps({"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "SAFETY"}]})))
    assert decoder.end() == [Finished(FinishReason.CONTENT_FILTER)]


def test_in_stream_error_and_malformed():
    with pytest.raises(Overloaded):
        ADAPTER.new_decoder().feed(SSEEvent(json.dumps({"error": {"code": 503, "message": "m", "status": "UNAVAILABLE"}})))
    with pytest.raises(MalformedStream):
        ADAPTER.new_decoder().feed(SSEEvent('{"candidates": ['))


@pytest.mark.parametrize(
    ("status", "error", "expected", "retry_after"),
    [
        (429, {"status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]}, RateLimited, 37.0),
        (503, {"status": "UNAVAILABLE"}, Overloaded, None),
        (500, {"status": "INTERNAL"}, UpstreamServerError, None),
        (504, {"status": "DEADLINE_EXCEEDED"}, UpstreamTimeout, None),
        (403, {"status": "PERMISSION_DENIED"}, UpstreamUnauthenticated, None),
        (400, {"status": "INVALID_ARGUMENT"}, UpstreamInvalidRequest, None),
        (404, {"status": "NOT_FOUND"}, UpstreamInvalidRequest, None),
    ],
)
def test_classify(status, error, expected, retry_after):
    result = ADAPTER.classify_error(status, {}, json.dumps({"error": {"code": status, "message": "m", **error}}).encode())
    assert type(result) is expected and result.retry_after_s == retry_after


def test_classify_recorded_invalid_key_body():
    result = ADAPTER.classify_error(400, {}, (FIXTURES / "gemini_api_key_invalid.json").read_bytes())
    assert type(result) is UpstreamUnauthenticated
