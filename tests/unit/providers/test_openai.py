"""OpenAI / compatible / Azure adapter: request mapping, stream decoding, error classification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.core.events import Finished, FinishReason, ReasoningDelta, TextDelta, ToolCallDelta, UsageReport
from server.core.request import ChatMessage, ChatRequest, ToolCall, ToolSpec
from server.errors import (
    ContentFiltered,
    ContextLengthExceeded,
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
from server.providers.openai import AzureOpenAIAdapter, OpenAIAdapter
from server.providers.sse import SSEDecoder, SSEEvent

FIXTURES = Path(__file__).resolve().parents[2] / "fakes" / "fixtures"
OPENAI = OpenAIAdapter("openai", "https://api.openai.com/v1", "max_completion_tokens")
COMPAT = OpenAIAdapter("openai-compatible", "", "max_tokens")
ENDPOINT = Endpoint("openai", "gpt-4o-mini", "https://api.openai.com/v1", Secret("sk-k"), (("OpenAI-Organization", "org-1"),))
TOOL = ToolSpec("get_weather", "Weather", '{"type": "object"}')

CONVERSATION = (
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Weather in Paris?", name="ann"),
    ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
    ChatMessage("tool", '{"temp": 21}', tool_call_id="call_1"),
    ChatMessage("assistant", "21 degrees."),
    ChatMessage("user", "Thanks"),
)


def body_of(adapter, request, endpoint=ENDPOINT):
    http = adapter.build_request(request, endpoint)
    return http, json.loads(http.content)


def test_build_maps_roles_params_and_tools():
    request = ChatRequest("pub", CONVERSATION, temperature=0.2, top_p=0.9, max_tokens=50, stop=("END",), seed=3,
                          tools=(TOOL,), tool_choice="get_weather")
    http, body = body_of(OPENAI, request)
    assert str(http.url) == "https://api.openai.com/v1/chat/completions"
    assert http.headers["authorization"] == "Bearer sk-k" and http.headers["openai-organization"] == "org-1"
    assert body["model"] == "gpt-4o-mini" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert body["messages"][1]["name"] == "ann"
    assert body["messages"][2] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}
    assert (body["temperature"], body["top_p"], body["max_completion_tokens"], body["stop"], body["seed"]) == (0.2, 0.9, 50, ["END"], 3)
    assert body["tools"][0]["function"]["parameters"] == {"type": "object"}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_compatible_server_uses_max_tokens_and_no_key():
    endpoint = Endpoint("openai-compatible", "llama3", "http://127.0.0.1:11434/v1")
    http, body = body_of(COMPAT, ChatRequest("pub", CONVERSATION, max_tokens=9), endpoint)
    assert str(http.url) == "http://127.0.0.1:11434/v1/chat/completions"
    assert "authorization" not in http.headers and body["max_tokens"] == 9


def test_azure_deployment_url_and_api_key():
    endpoint = Endpoint("azure", "my-dep", "https://res.openai.azure.com", Secret("az-k"), api_version="2024-10-21")
    http, body = body_of(AzureOpenAIAdapter(), ChatRequest("pub", CONVERSATION), endpoint)
    assert str(http.url) == "https://res.openai.azure.com/openai/deployments/my-dep/chat/completions?api-version=2024-10-21"
    assert http.headers["api-key"] == "az-k" and "authorization" not in http.headers
    assert "model" not in body


@pytest.mark.parametrize(
    "request_",
    [
        ChatRequest("p", CONVERSATION, stop=("a", "b", "c", "d", "e")),
        ChatRequest("p", CONVERSATION, tool_choice="auto"),  # no tools
        ChatRequest("p", CONVERSATION, tools=(TOOL,), tool_choice="other_tool"),
        ChatRequest("p", CONVERSATION, tools=(ToolSpec("t", "", "{not json"),)),
        ChatRequest("p", (ChatMessage("tool", "x"),)),  # no tool_call_id
    ],
)
def test_unhonourable_requests_are_invalid(request_):
    with pytest.raises(InvalidRequest):
        OPENAI.build_request(request_, ENDPOINT)


def decode_fixture(name: str):
    sse, decoder, events = SSEDecoder(), OPENAI.new_decoder(), []
    for sse_event in sse.decode((FIXTURES / name).read_bytes()) + sse.flush():
        events += decoder.feed(sse_event)
    return events


def test_decode_recorded_text_stream():
    events = decode_fixture("openai_text.sse")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).endswith("San Francisco news station.")
    assert events[-2:] == [UsageReport(14, 47, 0), Finished(FinishReason.STOP)]


def test_decode_recorded_tool_call_stream():
    events = decode_fixture("openai_tool_call.sse")
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert calls[0] == ToolCallDelta(0, "call_4XzlGBLtUe9dy3GVNV4jhq7h", "get_weather", "")
    assert "".join(c.arguments for c in calls) == '{"city":"New York City"}'
    assert events[-1] == Finished(FinishReason.TOOL_CALLS)


def feed(*payloads):
    decoder, out = OPENAI.new_decoder(), []
    for p in payloads:
        out += decoder.feed(SSEEvent(p if isinstance(p, str) else json.dumps(p)))
    return decoder, out


def test_compatible_quirks_whole_call_repeated_id_and_reasoning():
    _, events = feed(
        {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{\"a\""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"arguments": ":1}"}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 1, "function": {"name": "g", "arguments": "{}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "length"}]},
        "[DONE]",
    )
    assert events == [
        ReasoningDelta("hmm"),
        ToolCallDelta(0, "c1", "f", '{"a"'),
        ToolCallDelta(0, "", "", ":1}"),
        ToolCallDelta(1, "call_1", "g", "{}"),
        Finished(FinishReason.LENGTH),
    ]


def test_azure_prompt_filter_chunk_without_choices_is_ignored():
    _, events = feed({"choices": [], "prompt_filter_results": [{"prompt_index": 0}]})
    assert events == []


def test_in_stream_error_event_raises_classified():
    with pytest.raises(UpstreamServerError):
        feed({"error": {"message": "boom", "type": "server_error", "code": None}})
    with pytest.raises(RateLimited):
        feed({"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}})


def test_malformed_event_and_missing_done():
    with pytest.raises(MalformedStream):
        feed('{"choices": [')
    decoder, _ = feed({"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}]})
    with pytest.raises(StreamCut):  # a finish_reason without the usage chunk: not the end
        decoder.end()
    decoder, _ = feed({"choices": [{"delta": {"content": "x"}}]})
    decoder.feed(SSEEvent(json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})))
    with pytest.raises(StreamCut):  # usage without a finish_reason: cut
        decoder.end()


def test_finish_reason_and_usage_without_done_is_finished():
    decoder, _ = feed({"choices": [{"delta": {"content": "x"}, "finish_reason": "length"}]})
    decoder.feed(SSEEvent(json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})))
    assert decoder.end() == [Finished(FinishReason.LENGTH)]


@pytest.mark.parametrize(
    ("status", "headers", "error", "expected", "retry_after"),
    [
        (429, {"retry-after-ms": "250"}, {"code": "rate_limit_exceeded", "type": "requests"}, RateLimited, 0.25),
        (429, {"retry-after": "3"}, {"code": None, "type": "tokens"}, RateLimited, 3.0),
        (429, {}, {"code": "insufficient_quota", "type": "insufficient_quota"}, UpstreamUnauthenticated, None),
        (401, {}, {"code": "invalid_api_key", "type": "invalid_request_error"}, UpstreamUnauthenticated, None),
        (403, {}, {}, UpstreamUnauthenticated, None),
        (400, {}, {"code": "context_length_exceeded", "type": "invalid_request_error"}, ContextLengthExceeded, None),
        (400, {}, {"code": "content_filter", "type": None}, ContentFiltered, None),
        (400, {}, {"code": None, "type": "invalid_request_error", "message": "bad temperature"}, UpstreamInvalidRequest, None),
        (404, {}, {"code": "model_not_found"}, UpstreamInvalidRequest, None),
        (500, {}, {"type": "server_error"}, UpstreamServerError, None),
        (502, {}, {}, UpstreamServerError, None),
        (503, {"retry-after": "1"}, {"type": "server_error"}, Overloaded, 1.0),
    ],
)
def test_classify(status, headers, error, expected, retry_after):
    result = OPENAI.classify_error(status, headers, json.dumps({"error": error}).encode())
    assert type(result) is expected and result.status == status
    assert result.retry_after_s == retry_after


def test_classify_ignores_message_text_and_redacts_keys():
    body = json.dumps({"error": {"message": "Incorrect API key provided: sk-abcdefghijklmnop", "code": None}}).encode()
    result = OPENAI.classify_error(400, {}, body)
    assert type(result) is UpstreamInvalidRequest
    assert "sk-abcdefghijklmnop" not in result.body and "sk-abcdefghijklmnop" not in result.message
    assert type(OPENAI.classify_error(500, {}, b"<html>not json</html>")) is UpstreamServerError


def test_configured_headers_override_the_adapters_whatever_their_case():
    endpoint = Endpoint("openai", "m", "https://gw.example/v1", Secret("sk-k"), (("Authorization", "Bearer gateway"),))
    http, _ = body_of(OPENAI, ChatRequest("pub", (ChatMessage("user", "hi"),)), endpoint)
    assert http.headers["authorization"] == "Bearer gateway"
    assert [name for name in http.headers if name.lower() == "authorization"] == ["authorization"]


def test_a_context_length_error_keeps_the_providers_message_redacted():
    body = json.dumps({"error": {"code": "context_length_exceeded", "type": "invalid_request_error",
                                 "message": "This model's maximum context length is 128000 tokens (key sk-abcdef123456)."}}).encode()
    error = OPENAI.classify_error(400, {}, body)
    assert isinstance(error, ContextLengthExceeded) and error.status == 400
    assert "maximum context length is 128000 tokens" in error.message and "sk-abcdef123456" not in error.message
