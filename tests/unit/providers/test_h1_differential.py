"""h1.ResponseReader against h11, the reference sans-I/O HTTP/1.1 implementation (hypothesis).

Generated responses (interim 1xx heads, any status, headers with every legal name and value
character, Content-Length, chunked with extensions and trailers, or read-to-close bodies) split
at arbitrary points must be read exactly as h11 reads them: status, reason, headers, body, end
and keep-alive. Then the same responses with bytes inserted or replaced at random: whatever our
reader accepts, h11 must accept too and read the same way (we may refuse more than h11, e.g.
Transfer-Encoding with Content-Length or folded lines, never less).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.providers.h1 import ProtocolError, ResponseReader

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING = {"content-length", "transfer-encoding", "connection"}


@dataclass(frozen=True)
class Read:
    """What a reader made of the bytes: None for a refusal."""

    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    complete: bool
    keep_alive: bool | None  # None: not compared (HTTP/1.0, or a read-to-close body)


def read_ours(pieces: list[bytes]) -> Read | None:
    reader, body = ResponseReader(), b""
    try:
        for piece in pieces:
            reader.receive_data(piece)
            body += reader.body_to_read()
        keep_alive = reader.keep_alive
        complete_before_eof = reader.complete
        reader.receive_eof()
        body += reader.body_to_read()
    except ProtocolError:
        return None
    head = reader.head
    assert head is not None and reader.complete
    return Read(head.status, head.reason.encode("latin-1"), head.headers, body, True, keep_alive if complete_before_eof else None)


def read_h11(pieces: list[bytes]) -> Read | None:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
    conn.send(h11.Request(method="POST", target="/v1/chat", headers=[("Host", "upstream"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    response: h11.Response | None = None
    body, complete, keep_alive = b"", False, None
    try:
        for piece in [*pieces, b""]:  # b"": the connection closes
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    break
                if isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    complete = True
                    if piece:  # ended before the close: did it leave the connection open?
                        keep_alive = conn.their_state is h11.DONE
    except h11.RemoteProtocolError:
        return None
    if response is None or not complete:
        return None
    headers = tuple((bytes(name), bytes(value)) for name, value in response.headers.raw_items())
    headers = tuple((name.lower(), value) for name, value in headers)
    if response.http_version != b"1.1":
        keep_alive = None
    return Read(response.status_code, bytes(response.reason), headers, body, complete, keep_alive)


names = st.text(TOKEN, min_size=1, max_size=12).filter(lambda n: n.lower() not in FRAMING)
value_char = st.sampled_from([bytes([b]) for b in [*range(0x21, 0x7F), *range(0x80, 0x100)]])
inner = st.lists(st.one_of(value_char, st.sampled_from([b" ", b"\t"])), max_size=20).map(b"".join)
values = st.tuples(st.sampled_from([b"", b" ", b"\t", b"  "]), value_char, inner, value_char, st.sampled_from([b"", b" ", b"\t"])).map(
    lambda t: t[0] + (t[1] + t[2] + t[3]).strip(b" \t") + t[4]
)
reasons = st.lists(st.sampled_from([b"O", b"K", b" ", b"\t", b"\xe9", b"-"]), max_size=12).map(b"".join)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    out = b""
    for code in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):  # interim heads
        out += b"HTTP/1.1 %d Info\r\n" % code
        for name, value in draw(st.lists(st.tuples(names, values), max_size=2)):
            out += name.encode() + b":" + value + b"\r\n"
        out += b"\r\n"
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([200, 201, 204, 206, 304, 400, 401, 404, 429, 500, 503, 529]))
    out += version + b" %d " % status + draw(reasons) + b"\r\n"
    headers = [name.encode() + b":" + value for name, value in draw(st.lists(st.tuples(names, values), max_size=6))]
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    connection = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive, foo"]))
    if connection is not None:
        headers.append(b"Connection: " + connection)
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"Chunked", b" chunked "])))
    at = draw(st.integers(0, len(headers)))
    headers.insert(at, headers.pop()) if headers else None
    out += b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    if status in (204, 304):
        return out
    if framing == "chunked":
        sizes = draw(st.lists(st.integers(1, 64), max_size=6))
        pos = 0
        for size in sizes:
            part = body[pos : pos + size]
            if not part:
                break
            pos += len(part)
            ext = draw(st.sampled_from([b"", b";x=1", b";name", b"  "]))
            out += b"%x" % len(part) + ext + b"\r\n" + part + b"\r\n"
        trailers = draw(st.lists(st.tuples(names, values), max_size=2))
        return out + b"0\r\n" + b"".join(n.encode() + b":" + v + b"\r\n" for n, v in trailers) + b"\r\n"
    return out + body


def same(ours: Read | None, theirs: Read | None) -> bool:
    """Equal, but keep-alive only where h11 has a view: it never keeps an HTTP/1.0 connection
    (we honour `Connection: keep-alive` there, RFC 9112 9.3)."""
    if ours is not None and theirs is not None and theirs.keep_alive is None:
        ours = replace(ours, keep_alive=None)
    return _normal(ours) == _normal(theirs)


def _normal(read: Read | None) -> Read | None:
    """h11 stores the Transfer-Encoding value lowercased: a spelling, not a reading."""
    if read is None:
        return None
    return replace(read, headers=tuple((n, v.lower() if n == b"transfer-encoding" else v) for n, v in read.headers))


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True) if raw[a:b]]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(responses(), st.lists(st.integers(0, 10_000), max_size=6))
def test_valid_responses_are_read_as_h11_reads_them(raw, cuts):
    pieces = split(raw, cuts)
    ours, theirs = read_ours(pieces), read_h11(pieces)
    assert theirs is not None, raw  # the generator makes only valid responses
    assert same(ours, theirs), (raw, ours, theirs)


MUTANTS = [b":", b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b"\x0b", b"a", b"0", b"f", b";", b"\xff", b"G", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n"]


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(responses(), st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(MUTANTS), st.booleans()), min_size=1, max_size=3), st.lists(st.integers(0, 10_000), max_size=4))
def test_whatever_we_accept_h11_accepts_and_reads_the_same(raw, mutations, cuts):
    for at, mutant, replace in mutations:
        at %= len(raw) + 1
        raw = raw[:at] + mutant + raw[at + (len(mutant) if replace else 0) :]
    pieces = split(raw, cuts)
    ours = read_ours(pieces)
    if ours is not None:
        theirs = read_h11(pieces)
        assert same(ours, theirs), (raw, ours, theirs)
