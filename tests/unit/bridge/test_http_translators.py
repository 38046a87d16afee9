"""The sans-I/O translators of the HTTP APIs and the SSE transport's log, fed frames directly."""

from __future__ import annotations

import json

import pytest

from llmproxy.v1 import llmproxy_pb2 as pb
from bridge import anthropic_messages as anth
from bridge import openai_chat as oai
from bridge import openai_responses as resp
from bridge.openai_chat import ApiError
from bridge.sse_transport import SseLink

ASK = [{"role": "user", "content": "hi"}]


def started() -> pb.ServerFrame:
    return pb.ServerFrame(started=pb.StreamStarted(stream_id="s", seq=1, model="m"))


def token(text: str, seq: int) -> pb.ServerFrame:
    return pb.ServerFrame(token=pb.TokenDelta(stream_id="s", seq=seq, text=text))


def call(seq: int, arguments: str, index: int = 0, id_: str = "", name: str = "") -> pb.ServerFrame:
    return pb.ServerFrame(tool_call=pb.ToolCallDelta(stream_id="s", seq=seq, index=index, id=id_, name=name, arguments=arguments))


def done(seq: int, reason: int = pb.FINISH_REASON_STOP) -> pb.ServerFrame:
    usage = pb.Usage(prompt_tokens=3, completion_tokens=2)
    return pb.ServerFrame(done=pb.StreamDone(stream_id="s", seq=seq, finish_reason=reason, usage=usage))  # type: ignore[arg-type]


def sse_events(data: bytes) -> list[tuple[str | None, str]]:
    out = []
    for block in data.decode().split("\n\n"):
        if not block:
            continue
        name = None
        payload = ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                payload = line[6:]
            elif line.startswith(":"):
                payload = line
        out.append((name, payload))
    return out


# -- chat completions ------------------------------------------------------------------------------


def test_chat_request_maps_fields_and_names_what_it_cannot_honour():
    req = oai.parse_chat_request(
        {"model": "m", "messages": [{"role": "developer", "content": "be brief"}, *ASK], "max_completion_tokens": 7, "stream": True,
         "stream_options": {"include_usage": True}, "n": 1, "user": "u1",
         "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}]},
        1 << 20, 100,
    )
    start = req.start.start
    assert req.stream and req.include_usage and start.stream_id == oai.STREAM_ID
    assert [m.role for m in start.messages] == ["system", "user"] and start.params.max_tokens == 7 and start.tools[0].name == "f"
    for body, param in (({"n": 2}, "n"), ({"logit_bias": {"1": 2}}, "logit_bias"), ({"frobnicate": True}, "frobnicate"),
                        ({"response_format": {"type": "json_object"}}, "response_format")):
        with pytest.raises(ApiError) as info:
            oai.parse_chat_request({"model": "m", "messages": ASK, **body}, 1 << 20, 100)
        assert info.value.status == 400 and info.value.param == param
    with pytest.raises(ApiError):
        oai.parse_chat_request({"model": "m", "messages": []}, 1 << 20, 100)


def test_chat_stream_chunks_with_and_without_include_usage():
    for include_usage in (True, False):
        enc = oai.ChatEncoder("m", include_usage, created=1)
        data = b"".join(enc.stream_frame(f) for f in (started(), token("Hel", 2), token("lo", 3), done(4)))
        events = [e for _, e in sse_events(data)]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello"
        with_usage = [c for c in chunks if c.get("usage")]
        assert len(with_usage) == 1 and with_usage[0]["usage"]["total_tokens"] == 5
        if include_usage:
            assert with_usage[0]["choices"] == [] and all("usage" in c for c in chunks)
        else:
            assert with_usage[0]["choices"][0]["finish_reason"] == "stop" and all("usage" not in c for c in chunks[:-1])
        assert enc.finished is not None and enc.finished["choices"][0]["message"]["content"] == "Hello"


def test_chat_token_chunks_from_the_fast_path_are_the_chunks_json_would_make():
    for include_usage in (True, False):
        enc = oai.ChatEncoder("m\"odel", include_usage, created=5)
        text = 'a "quoted" \\ line\nand é'
        fast = enc.stream_frame(token(text, 2))
        assert fast == enc._chunk({"content": text})
        assert json.loads(fast[6:])["choices"][0]["delta"]["content"] == text


def test_chat_tool_call_fragments_as_openai_streams_them():
    enc = oai.ChatEncoder("m", False)
    first = json.loads(sse_events(enc.stream_frame(call(2, "", id_="call_1", name="f")))[0][1])
    later = json.loads(sse_events(enc.stream_frame(call(3, '{"a":')))[0][1])
    enc.stream_frame(call(4, "1}"))
    enc.stream_frame(done(5, pb.FINISH_REASON_TOOL_CALLS))
    assert first["choices"][0]["delta"]["tool_calls"] == [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]
    assert later["choices"][0]["delta"]["tool_calls"] == [{"index": 0, "function": {"arguments": '{"a":'}}]
    message = enc.finished["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a":1}'}
    assert enc.finished["choices"][0]["finish_reason"] == "tool_calls"


def test_error_table_statuses():
    assert oai.api_error(pb.ERROR_CODE_UNKNOWN_MODEL, "x").status == 404
    assert oai.api_error(pb.ERROR_CODE_UNKNOWN_MODEL, "x").code == "model_not_found"
    assert oai.api_error(pb.ERROR_CODE_UNAUTHENTICATED, "x").status == 401
    assert oai.api_error(pb.ERROR_CODE_FORBIDDEN_MODEL, "x").status == 403
    limited = oai.api_error(pb.ERROR_CODE_RATE_LIMITED, "x", retry_after_ms=1500)
    assert limited.status == 429 and oai.retry_headers(limited) == {"retry-after": "2", "retry-after-ms": "1500"}
    assert {oai.api_error(c, "x").status for c in pb.ErrorCode.values()} <= {400, 401, 403, 404, 413, 429, 500, 502, 503, 504}
    assert all(c in oai.ERROR_STATUS for c in pb.ErrorCode.values() if c)


# -- Anthropic messages ------------------------------------------------------------------------------


def test_anthropic_request_becomes_openai_shaped_messages():
    body = {
        "model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "sys"}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "text", "text": "let me see"}, {"type": "tool_use", "id": "t1", "name": "w", "input": {"c": "P"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]},
        ],
        "tools": [{"name": "w", "input_schema": {"type": "object"}}], "tool_choice": {"type": "any"},
    }
    start = anth.parse_messages_request(body, 1 << 20, 100).start.start
    assert [m.role for m in start.messages] == ["system", "user", "assistant", "tool"]
    assert start.messages[2].tool_calls[0].arguments == '{"c":"P"}' and start.messages[3].tool_call_id == "t1"
    assert start.tool_choice == "required" and start.params.max_tokens == 10
    with pytest.raises(ApiError) as info:
        anth.parse_messages_request({**body, "top_k": 3}, 1 << 20, 100)
    assert "top_k" in info.value.message


def test_anthropic_events_in_order():
    enc = anth.MessagesEncoder("m")
    data = b"".join(enc.stream_frame(f) for f in (started(), token("Hi", 2), call(3, '{"c":', id_="t1", name="w"), call(4, '"P"}'), done(5, pb.FINISH_REASON_TOOL_CALLS)))
    names = [n for n, _ in sse_events(data)]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert enc.finished["content"] == [{"type": "text", "text": "Hi"}, {"type": "tool_use", "id": "t1", "name": "w", "input": {"c": "P"}}]
    assert enc.finished["stop_reason"] == "tool_use" and enc.finished["usage"] == {"input_tokens": 3, "output_tokens": 2}


# -- Responses -------------------------------------------------------------------------------------


def test_responses_events_are_numbered_and_complete():
    enc = resp.ResponsesEncoder("m")
    data = b"".join(enc.stream_frame(f) for f in (started(), token("Hi", 2), call(3, "{}", id_="c1", name="f"), done(4, pb.FINISH_REASON_TOOL_CALLS)))
    events = sse_events(data)
    bodies = [json.loads(p) for _, p in events]
    assert [b["sequence_number"] for b in bodies] == list(range(len(bodies)))
    assert [n for n, _ in events] == [b["type"] for b in bodies]
    assert bodies[0]["type"] == "response.created" and bodies[-1]["type"] == "response.completed"
    output = bodies[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["message", "function_call"] and output[1]["arguments"] == "{}"
    length = resp.ResponsesEncoder("m")
    length.stream_frame(started())
    assert b"response.incomplete" in length.stream_frame(done(2, pb.FINISH_REASON_LENGTH))


def test_responses_request_rejects_what_it_cannot_do():
    ok = resp.parse_responses_request(
        {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                                 {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                                 {"type": "function_call_output", "call_id": "c", "output": "ok"}],
         "instructions": "sys", "stream": True}, 1 << 20, 100)
    assert [m.role for m in ok.start.start.messages] == ["system", "user", "assistant", "tool"]
    for body, param in (({"previous_response_id": "r"}, "previous_response_id"), ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
                        ({"tools": [{"type": "file_search"}]}, "tools[0].type"), ({"text": {"format": {"type": "json_object"}}}, "text")):
        with pytest.raises(ApiError) as info:
            resp.parse_responses_request({"model": "m", "input": "hi", **body}, 1 << 20, 100)
        assert info.value.param == param


# -- the SSE transport's log -----------------------------------------------------------------------


def test_sse_log_resumes_after_the_last_event_id_and_refuses_what_it_dropped():
    link = SseLink("sid", pb.RelayOpen(), max_pending_bytes=400)
    for i in range(3):
        link.deliver(token(f"t{i}", i + 1))
    data, position = link.events_after(0)
    assert position == 3 and data.count(b"id: ") == 3 and data.startswith(b"id: 1\n")
    assert link.received_through(2)
    assert link.events_after(2)[0].startswith(b"id: 3\n")
    assert not link.received_through(1)  # older than what it kept: the frames are gone
    assert not link.received_through(9)  # never sent
    for i in range(3, 20):
        link.deliver(token("x" * 40, i + 1))
    assert not link.received_through(3)  # dropped to stay under max_pending_bytes
    link.ended(pb.ERROR_CODE_EXPIRED, "gone")
    assert link.ended_code == 1012 and b'"expired"' in link.events_after(19)[0]
