"""The incremental SSE decoder: WHATWG event-stream rules, every split point, all line endings."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import EventTooLarge
from server.providers.sse import SSEDecoder, SSEEvent

FIXTURES = Path(__file__).resolve().parents[2] / "fakes" / "fixtures"


def decode_all(*chunks: bytes) -> list[SSEEvent]:
    d = SSEDecoder()
    events = []
    for chunk in chunks:
        events += d.decode(chunk)
    return events + d.flush()


STREAM = (
    ": keep-alive comment\n"
    "event: message_start\n"
    "data: {\"a\": 1}\n"
    "\n"
    "id: 7\n"
    "retry: 1500\n"
    "data: first line\n"
    "data:second line\n"
    "data\n"
    "unknown: field\n"
    "\n"
    "event: ping\n"
    "\n"  # no data: not dispatched, and the type does not leak into the next event
    "data: héllo wörld ✓\n"
    "\n"
).encode()
EXPECTED = [
    SSEEvent('{"a": 1}', "message_start", "", None),
    SSEEvent("first line\nsecond line\n", "message", "7", 1500),
    SSEEvent("héllo wörld ✓", "message", "7", 1500),
]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_whole_stream_with_each_line_ending(ending):
    assert decode_all(STREAM.replace(b"\n", ending)) == EXPECTED


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_every_single_split_point(ending):
    data = STREAM.replace(b"\n", ending)
    for i in range(len(data) + 1):
        assert decode_all(data[:i], data[i:]) == EXPECTED, f"split at {i}"


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_byte_by_byte(ending):
    data = STREAM.replace(b"\n", ending)
    assert decode_all(*[data[i : i + 1] for i in range(len(data))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM) + 2), max_size=12), st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_any_chunking(cuts, ending):
    data = STREAM.replace(b"\n", ending)
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    assert decode_all(*pieces) == EXPECTED


def test_multibyte_character_split_between_chunks():
    data = "data: ✓✓\n\n".encode()
    cut = data.index("✓".encode()) + 1  # inside the first 3-byte character
    assert decode_all(data[:cut], data[cut:]) == [SSEEvent("✓✓")]


def test_bom_is_dropped_even_when_split():
    data = b"\xef\xbb\xbfdata: x\n\n"
    for i in range(5):
        assert decode_all(data[:i], data[i:]) == [SSEEvent("x")]


def test_id_with_nul_is_ignored_and_bad_retry_too():
    assert decode_all(b"id: a\x00b\nretry: 12x\ndata: x\n\n") == [SSEEvent("x", "message", "", None)]


def test_flush_dispatches_an_event_without_its_blank_line():
    d = SSEDecoder()
    assert d.decode(b"event: message_stop\ndata: {}") == []
    assert d.flush() == [SSEEvent("{}", "message_stop")]
    assert d.flush() == []


def test_empty_chunks_are_harmless():
    assert decode_all(b"", b"data: x\r", b"", b"\n\n", b"") == [SSEEvent("x")]


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.sse")))
def test_recorded_fixtures_decode_to_json_events(name):
    import json

    events = decode_all((FIXTURES / name).read_bytes())
    assert len(events) >= 3
    for event in events:
        if event.data != "[DONE]":
            json.loads(event.data)


# -- size caps -----------------------------------------------------------------------------------


def test_a_line_that_never_ends_is_refused_once_over_the_cap():
    d = SSEDecoder(max_line_bytes=100, max_event_bytes=1000)
    assert d.decode(b"data: " + b"x" * 50) == []
    with pytest.raises(EventTooLarge, match="line over 100 bytes"):
        for _ in range(10):
            d.decode(b"x" * 20)  # never a line end: the buffer must not grow without bound


def test_a_long_line_inside_one_chunk_is_refused():
    d = SSEDecoder(max_line_bytes=100, max_event_bytes=1000)
    with pytest.raises(EventTooLarge, match="line over 100 bytes"):
        d.decode(b"data: " + b"x" * 200 + b"\n\n")


def test_an_event_of_many_lines_over_the_cap_is_refused_within_one_chunk():
    d = SSEDecoder(max_line_bytes=100, max_event_bytes=300)
    with pytest.raises(EventTooLarge, match="event over 300 bytes"):
        d.decode(b"data: " + b"y" * 90 + b"\n" * 1 + (b"data: " + b"y" * 90 + b"\n") * 4 + b"\n")


def test_an_event_growing_across_chunks_is_refused_before_its_end():
    d = SSEDecoder(max_line_bytes=100, max_event_bytes=300)
    with pytest.raises(EventTooLarge, match="event over 300 bytes"):
        for _ in range(10):
            d.decode(b"data: " + b"z" * 90 + b"\n")  # no blank line: the event never dispatches


def test_lines_and_events_at_the_caps_pass():
    d = SSEDecoder(max_line_bytes=106, max_event_bytes=201)
    line = b"data: " + b"a" * 100 + b"\n"  # 106 bytes without the LF
    events = d.decode(line[:50]) + d.decode(line[50:] + line + b"\n") + d.flush()
    assert [len(e.data) for e in events] == [201]


def test_the_default_caps_hold_a_large_real_event():
    payload = b'{"x": "' + b"b" * (4 * 1024 * 1024) + b'"}'  # a Gemini event with an inline image
    events = decode_all(b"data: " + payload[:1000], payload[1000:] + b"\n\n")
    assert len(events) == 1 and len(events[0].data) == len(payload)
