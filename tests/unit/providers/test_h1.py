"""The sans-I/O HTTP/1.1 response reader, fed bytes split at every position."""

from __future__ import annotations

import pytest

from server.providers.h1 import Phase, ProtocolError, ResponseReader, request_bytes
from server.providers.http import _target_and_host

CHUNKED = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"f\r\ndata: {\"a\":1}\n\n\r\n"
    b"10;ext=1\r\ndata: {\"b\":22}\n\n\r\n"
    b"0\r\n"
    b"X-Trailer: yes\r\n"
    b"\r\n"
)
BODY = b'data: {"a":1}\n\ndata: {"b":22}\n\n'


def read_all(pieces: list[bytes], eof: bool = False) -> tuple[ResponseReader, bytes]:
    reader = ResponseReader()
    body = b""
    for piece in pieces:
        reader.receive_data(piece)
        body += reader.body_to_read()
    if eof:
        reader.receive_eof()
        body += reader.body_to_read()
    return reader, body


@pytest.mark.parametrize("cut", range(1, len(CHUNKED)))
def test_chunked_body_split_anywhere(cut):
    reader, body = read_all([CHUNKED[:cut], CHUNKED[cut:]])
    assert reader.complete and reader.keep_alive and body == BODY
    assert reader.head is not None and reader.head.status == 200
    assert reader.head.get(b"content-type") == b"text/event-stream"


def test_chunked_body_byte_by_byte():
    reader, body = read_all([CHUNKED[i : i + 1] for i in range(len(CHUNKED))])
    assert reader.complete and body == BODY


def test_each_chunk_is_handed_over_as_it_arrives():
    head, rest = CHUNKED.split(b"\r\n\r\n", 1)
    reader = ResponseReader()
    reader.receive_data(head + b"\r\n\r\n")
    assert reader.head is not None and reader.body_to_read() == b"" and not reader.complete
    reader.receive_data(b"f\r\ndata: {\"a\":1}\n\n\r\n")
    assert reader.body_to_read() == b'data: {"a":1}\n\n'
    assert reader.phase is Phase.CHUNK_SIZE


def test_content_length_body():
    raw = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 5\r\nRetry-After: 2\r\n\r\nhello"
    for cut in range(1, len(raw)):
        reader, body = read_all([raw[:cut], raw[cut:]])
        assert reader.complete and body == b"hello" and reader.head.status == 429
        assert reader.head.get(b"retry-after") == b"2" and reader.head.reason == "Too Many Requests"


def test_body_until_close():
    reader, body = read_all([b"HTTP/1.1 200 OK\r\n\r\nabc", b"def"], eof=True)
    assert reader.complete and body == b"abcdef" and not reader.keep_alive


def test_interim_answers_are_skipped():
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    reader, body = read_all([raw])
    assert reader.complete and reader.head.status == 204 and body == b""


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", True),
    ],
)
def test_keep_alive(head, keep_alive):
    reader, _ = read_all([head])
    assert reader.complete and reader.keep_alive is keep_alive


def test_head_request_has_no_body():
    reader = ResponseReader(no_body=True)
    reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert reader.complete


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
def test_broken_framing_is_a_protocol_error(raw):
    with pytest.raises(ProtocolError):
        ResponseReader().receive_data(raw)


@pytest.mark.parametrize(
    "raw",
    [
        # RFC 9112 6.1: both framings at once, the request-smuggling pattern
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        # chunked twice, or not last; codings we cannot undo
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: br, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: compress\r\n\r\n",
        # header names that are not tokens, values with NUL, a bare CR or LF, VT
        b"HTTP/1.1 200 OK\r\nX Y: z\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n(bad): z\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX\x00: z\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX\xe9: z\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX : z\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n: z\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x0bb\r\nContent-Length: 0\r\n\r\n",
        # found by the differential test against h11: a CR in the reason, a malformed trailer
        b"HTTP/1.1 200 \r\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n:0:!!\r\n\r\n",
    ],
)
def test_heads_that_are_refused(raw):
    with pytest.raises(ProtocolError):
        ResponseReader().receive_data(raw)


def test_oversized_head_is_refused():
    reader = ResponseReader()
    with pytest.raises(ProtocolError):
        reader.receive_data(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\n",
    ],
)
def test_close_before_the_end_is_a_protocol_error(raw):
    reader = ResponseReader()
    reader.receive_data(raw)
    with pytest.raises(ProtocolError):
        reader.receive_eof()


def test_request_bytes():
    raw = request_bytes(b"POST", b"/v1/chat?x=1", [(b"Host", b"a:1"), (b"Content-Length", b"2")], b"{}")
    assert raw == b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: a:1\r\nContent-Length: 2\r\n\r\n{}"
    with pytest.raises(ValueError):
        request_bytes(b"GET", b"/", [(b"X", b"a\r\nInjected: 1")], b"")


@pytest.mark.parametrize(
    ("url", "target", "host"),
    [
        ("http://127.0.0.1:8080/v1/chat/completions", b"/v1/chat/completions", b"127.0.0.1:8080"),
        ("https://api.example/v1/models/gemini 2:stream?alt=sse", b"/v1/models/gemini%202:stream?alt=sse", b"api.example"),
        ("https://user@api.example", b"/", b"api.example"),
        ("https://bücher.example/x", b"/x", b"xn--bcher-kva.example"),
        ("http://[::1]:9/a%2Fb", b"/a%2Fb", b"[::1]:9"),
        ("http://h/p?api-version=2024-10-21&x=a b", b"/p?api-version=2024-10-21&x=a%20b", b"h"),
    ],
)
def test_request_target_and_host_of_a_url(url, target, host):
    assert _target_and_host(url) == (target, host)


def test_gzip_under_chunked_is_listed_for_the_driver_to_undo():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Encoding: deflate\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    reader, body = read_all([raw])
    assert reader.complete and reader.keep_alive and body == b"abc"  # still framed by chunked
    assert reader.head.transfer_codings == (b"gzip",)
    reader, body = read_all([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity, GZip\r\n\r\nxyz"], eof=True)
    assert reader.head.transfer_codings == (b"gzip",) and body == b"xyz" and not reader.keep_alive
    reader, _ = read_all([CHUNKED])
    assert reader.head.transfer_codings == ()


def test_header_values_keep_inner_whitespace_and_obs_text():
    reader, _ = read_all([b"HTTP/1.1 200 OK\r\nX-A:\t a \t b \t\r\nX-B: caf\xe9\r\nX-C:\r\nContent-Length: 0\r\n\r\n"])
    assert reader.head.headers[:3] == ((b"x-a", b"a \t b"), (b"x-b", b"caf\xe9"), (b"x-c", b""))
