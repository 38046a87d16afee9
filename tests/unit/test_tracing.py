"""server/tracing.py without sockets: traceparent parsing, span building, the OTLP/JSON shape."""

from __future__ import annotations

import asyncio
import random

import pytest

from server.core.session import StreamRecord
from server.core.stream import TimingSummary
from server.tracing import (
    STATUS_ERROR,
    Span,
    TraceContext,
    Tracer,
    inject_traceparent,
    otlp_json,
    outgoing_traceparent,
    parse_traceparent,
    traceparent_of,
)

TID, SID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "value, expected",
    [
        (f"00-{TID}-{SID}-01", TraceContext(TID, SID, True)),
        (f"00-{TID.upper()}-{SID}-00", TraceContext(TID, SID, False)),
        (f" 00-{TID}-{SID}-03 ".encode(), TraceContext(TID, SID, True)),
        (f"ff-{TID}-{SID}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{SID}-01", None),
        (f"00-{TID}-{'0' * 16}-01", None),
        (f"00-{TID}-{SID}", None),
        ("garbage", None),
        (None, None),
    ],
)
def test_parse_traceparent(value, expected):
    assert parse_traceparent(value) == expected


def test_traceparent_of_metadata_and_round_trip():
    assert traceparent_of((("authorization", "Bearer x"), ("TraceParent", f"00-{TID}-{SID}-01"))) == TraceContext(TID, SID)
    assert traceparent_of(()) is None and traceparent_of(None) is None
    assert TraceContext(TID, SID, False).traceparent() == f"00-{TID}-{SID}-00"


class Collect:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def export(self, spans):
        self.spans.extend(spans)

    async def aclose(self) -> None:
        pass


def record(status="stop", failed=False) -> StreamRecord:
    timing = TimingSummary(ttft_us=120_000, total_us=500_000, tokens=7, tokens_per_s=10.0, itl_p50_us=1, itl_p95_us=1, itl_p99_us=1, itl_max_us=1, stalls=0, relay_p50_us=1, relay_max_us=1, attempts=2)
    return StreamRecord("sess", "s1", "key-1", "pub", "openai", "dep-2", status, failed, timing, 1.0, 11, 7, 0)


async def run_attempts(tracer: Tracer, parent: TraceContext | None):
    trace = tracer.begin_stream("sess", "s1", parent)
    assert tracer.begin_stream("sess", "s1", parent) is trace  # a modify restart keeps the stream span
    tracer.begin_attempt(trace, "openai", "m-a", "dep-1")
    first = outgoing_traceparent.get()
    tracer.begin_attempt(trace, "openai", "m-b", "dep-2")
    second = outgoing_traceparent.get()
    headers: dict[str, str] = {}
    inject_traceparent(headers)
    tracer.end_attempt(trace, None)
    assert outgoing_traceparent.get() is None
    return trace, first, second, headers


def test_stream_and_attempt_spans_link_up():
    sink = Collect()
    clock = iter(range(1_000, 10_000_000, 1_000))
    tracer = Tracer(sink, random.Random(1), lambda: next(clock))
    trace, first, second, headers = asyncio.run(run_attempts(tracer, TraceContext(TID, SID)))
    assert headers == {"traceparent": second.traceparent()} and first != second
    tracer.end_streams([record()])
    tracer.end_streams([record()])  # a record seen twice makes no second span
    a1, a2, stream = sink.spans
    assert (stream.trace_id, stream.parent_span_id, stream.span_id) == (TID, SID, trace.context.span_id)
    assert stream.end_ns - stream.start_ns == 500_000_000
    attributes = dict(stream.attributes)
    assert attributes["gen_ai.response.model"] == "m-b" and attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.server.time_to_first_token"] == pytest.approx(0.12)
    assert "key-1" not in repr(stream) and "sess" not in repr(stream)  # no key id, no session id
    assert (a1.span_id, a2.span_id) == (first.span_id, second.span_id)
    assert a1.parent_span_id == a2.parent_span_id == stream.span_id
    assert (a1.status, dict(a1.attributes)["error.type"]) == (STATUS_ERROR, "attempt_failed") and "error.type" not in dict(a2.attributes)


def test_root_trace_unsampled_parent_and_a_failed_stream():
    sink = Collect()
    tracer = Tracer(sink, random.Random(2))
    trace = tracer.begin_stream("sess", "s1", None)
    assert trace.parent_span_id == "" and len(trace.context.trace_id) == 32
    tracer.end_streams([record("rate_limited", failed=True)])
    (span,) = sink.spans
    assert span.status == STATUS_ERROR and dict(span.attributes)["error.type"] == "rate_limited"
    tracer.begin_stream("sess", "s1", TraceContext(TID, SID, sampled=False))
    tracer.end_streams([record()])
    assert len(sink.spans) == 1  # the caller did not sample it: not exported


def test_otlp_json_shape():
    span = Span(TID, SID, "", "chat m", 2, 10, 20, (("a", "x"), ("n", 3), ("f", 0.5), ("b", True), ("l", ("stop",))), STATUS_ERROR, "boom")
    body = otlp_json([span], {"service.name": "llmproxy"})
    (rs,) = body["resourceSpans"]
    (out,) = rs["scopeSpans"][0]["spans"]
    assert rs["resource"]["attributes"] == [{"key": "service.name", "value": {"stringValue": "llmproxy"}}]
    assert "parentSpanId" not in out and out["startTimeUnixNano"] == "10" and out["status"] == {"code": 2, "message": "boom"}
    assert [a["value"] for a in out["attributes"]] == [
        {"stringValue": "x"}, {"intValue": "3"}, {"doubleValue": 0.5}, {"boolValue": True}, {"arrayValue": {"values": [{"stringValue": "stop"}]}},
    ]
