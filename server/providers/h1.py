"""A sans-I/O HTTP/1.1 response reader for streamed answers (RFC 9112), and the request writer.

Theory of operation. `ResponseReader.receive_data(bytes)` takes what the socket gave, in pieces
of any size; `head` is set once the status line and headers are in; `body_to_read()` hands over
the body bytes decoded so far (chunked framing removed); `complete` turns true at the end of the
message, and `keep_alive` says whether the connection may carry another request. A closed
connection is `receive_eof()`: it ends a body delimited by the close, and is an error anywhere
else. Interim 1xx answers are skipped. The reader imports no asyncio and no httpx, so the unit
tests feed it bytes split at every position.

Why our own: a token of a streamed answer is one small chunk per socket read. Through
httpx over aiohttp, each cost 40-50 us of CPU in layers of async generators, and opening each
request about 800 us; this reader costs a few microseconds a chunk. Against aiohttp's own API
in the whole chain (bench.run --transports native,aiohttp, 2026-12-01) the CPU per token is
within noise (40.0 against 30.0 us at (i), 155.3 against 158.3 us at (iii)-50) and what stays
is the cheaper request: added first-token p50 22.06 against 25.15 ms with 50 streams opening
at once (docs/configuration.md).

What it refuses (ProtocolError, the connection is then unusable): a header name that is not an
RFC 9110 token, a value holding NUL, CR, LF, VT or FF, a folded line; a response with both
Transfer-Encoding and Content-Length (RFC 9112 6.1: "ought to be handled as an error", the
request-smuggling pattern), `chunked` anywhere but last, or applied twice, a transfer coding it
cannot undo, and conflicting Content-Lengths. Transfer codings under `chunked` (`gzip, chunked`)
are listed in `ResponseHead.transfer_codings` for the driver to undo, like a Content-Encoding.
Every accepted response is read as h11 reads it: tests/unit/providers/test_h1_differential.py
feeds both generated responses, split anywhere.

Phases of one message, in a table (h11 style): the head, then one of the body framings, then
done. Inside a chunked body the reader moves between a chunk's size line, its data, the CRLF
after the data, and the trailer section; a chunk that is whole in the buffer (the usual case)
is taken in one step without leaving CHUNK_SIZE.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 4096
# A chunk's size line (RFC 9112 7.1): hex digits, then optional whitespace and extensions.
_CHUNK_LINE = re.compile(rb"[ \t]*([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")
# The status line (RFC 9112 4): the reason phrase without NUL, CR, LF, VT or FF (as h11).
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([0-9]{3})(?: ([^\x00\r\n\x0b\x0c]*))?")
# A header line (RFC 9110 5.1, 5.5; RFC 9112 5): a token, a colon, optional whitespace, a value
# without NUL, CR, LF (nor VT and FF, as h11), optional whitespace.
_HEADER_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*([^\x00\r\n\x0b\x0c]*?)[ \t]*")
# The transfer codings the driver can undo under `chunked` (RFC 9112 7: gzip, x-gzip, deflate).
DECODABLE_CODINGS = frozenset({b"gzip", b"x-gzip", b"deflate"})


class ProtocolError(Exception):
    """The upstream broke HTTP/1.1 framing (or the message ended early); the connection is unusable."""


class Phase(enum.Enum):
    HEAD = "head"
    LENGTH = "length"  # a body of Content-Length bytes
    CHUNK_SIZE = "chunk-size"
    CHUNK_DATA = "chunk-data"
    CHUNK_END = "chunk-end"  # the CRLF after a chunk's data
    TRAILERS = "trailers"
    UNTIL_CLOSE = "until-close"  # no length given: the body ends when the connection does
    DONE = "done"


# The moves of `_move`; anything else is a bug of ours, not of the upstream.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.HEAD: frozenset({Phase.HEAD, Phase.LENGTH, Phase.CHUNK_SIZE, Phase.UNTIL_CLOSE, Phase.DONE}),
    Phase.LENGTH: frozenset({Phase.DONE}),
    Phase.CHUNK_SIZE: frozenset({Phase.CHUNK_DATA, Phase.TRAILERS}),
    Phase.CHUNK_DATA: frozenset({Phase.CHUNK_END}),
    Phase.CHUNK_END: frozenset({Phase.CHUNK_SIZE}),
    Phase.TRAILERS: frozenset({Phase.DONE}),
    Phase.UNTIL_CLOSE: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The status line and headers; names lowercased, values as sent (latin-1 bytes).
    `transfer_codings`: the codings applied under the message framing, in the order the sender
    applied them (lowercase; `chunked` left out), for the reader of the body to undo."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...]
    transfer_codings: tuple[bytes, ...] = ()

    def get(self, name: bytes) -> bytes | None:
        """The last value of header `name` (lowercase), or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


def request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """One request, head and body, ready for the socket. `headers` must hold Host and, when there
    is a body, Content-Length (the native upstream in http.py adds both)."""
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
            raise ValueError("a header name or value holds a line break")
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


class ResponseReader:
    """Reads one response; see the module docstring. Raises `ProtocolError` on broken framing."""

    __slots__ = ("phase", "head", "keep_alive", "received_any", "_buf", "_left", "_body", "_no_body")

    def __init__(self, no_body: bool = False) -> None:
        self.phase = Phase.HEAD
        self.head: ResponseHead | None = None
        self.keep_alive = False
        self.received_any = False  # any byte of the response arrived (a reused connection's probe)
        self._buf = b""
        self._left = 0
        self._body: list[bytes] = []
        self._no_body = no_body  # the answer to a HEAD request has no body whatever its headers say

    @property
    def complete(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def buffered(self) -> int:
        """Decoded body bytes not yet taken (for flow control)."""
        return sum(map(len, self._body))

    def body_to_read(self) -> bytes:
        """The body bytes decoded since the last call (b"" when none)."""
        body = self._body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        if not data:
            return
        self.received_any = True
        if self._buf:
            data = self._buf + data
            self._buf = b""
        phase = self.phase
        if phase is Phase.HEAD:
            data = self._read_heads(data)
            phase = self.phase
            if not data:
                return
        if phase is Phase.CHUNK_SIZE or phase is Phase.CHUNK_DATA or phase is Phase.CHUNK_END or phase is Phase.TRAILERS:
            self._read_chunked(data)
        elif phase is Phase.LENGTH:
            left = self._left
            if len(data) < left:
                self._body.append(data)
                self._left = left - len(data)
            else:
                self._body.append(data[:left])
                self._left = 0
                self._move(Phase.DONE)
                if len(data) > left:
                    raise ProtocolError("bytes after the end of the response")
        elif phase is Phase.UNTIL_CLOSE:
            self._body.append(data)
        elif phase is Phase.DONE:
            raise ProtocolError("bytes after the end of the response")

    def receive_eof(self) -> None:
        """The connection closed. Ends a close-delimited body; raises `ProtocolError` elsewhere."""
        if self.phase is Phase.UNTIL_CLOSE:
            self._move(Phase.DONE)
        elif self.phase is not Phase.DONE:
            raise ProtocolError("the connection closed before the response ended")
        self.keep_alive = False

    # -- internals -------------------------------------------------------------------------------

    def _move(self, to: Phase) -> None:
        if to not in TRANSITIONS[self.phase]:
            raise AssertionError(f"h1: {self.phase.value} -> {to.value}")
        self.phase = to

    def _read_heads(self, data: bytes) -> bytes:
        """Parses heads (skipping 1xx ones) and returns the bytes after the final head."""
        while self.phase is Phase.HEAD:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD_BYTES:
                    raise ProtocolError("the response head is too large")
                self._buf = data
                return b""
            if end > MAX_HEAD_BYTES:
                raise ProtocolError("the response head is too large")
            self._parse_head(data[:end])
            data = data[end + 4 :]
        return data

    def _parse_head(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None:
            raise ProtocolError("not an HTTP/1.1 status line")
        version, status, reason = status_line[1], int(status_line[2]), status_line[3] or b""
        headers = []
        match = _HEADER_LINE.fullmatch
        for line in lines[1:]:
            field = match(line)
            if field is None:
                raise ProtocolError(f"a malformed header line: {line[:60]!r}")
            headers.append((field[1].lower(), field[2]))
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("an unexpected protocol switch")
            return  # interim (100 Continue, 103 Early Hints): the real head follows
        connection = {t.strip().lower() for v in _values(headers, b"connection") for t in v.split(b",")}
        self.keep_alive = b"close" not in connection if version == b"HTTP/1.1" else b"keep-alive" in connection
        codings = [t.strip().lower() for v in _values(headers, b"transfer-encoding") for t in v.split(b",") if t.strip()]
        lengths = {v.strip() for v in _values(headers, b"content-length")}
        if codings and lengths:
            raise ProtocolError("a response with both Transfer-Encoding and Content-Length")
        chunked = bool(codings) and codings[-1] == b"chunked"
        under = codings[:-1] if chunked else codings
        for coding in under:
            if coding == b"chunked":
                raise ProtocolError("chunked is not the last transfer coding, or is applied twice")
            if coding not in DECODABLE_CODINGS and coding != b"identity":
                raise ProtocolError(f"an unsupported transfer coding: {coding.decode('latin-1')!r}")
        if lengths and (len(lengths) != 1 or not next(iter(lengths)).isdigit()):
            raise ProtocolError("an invalid Content-Length")  # checked even where no body follows
        head = ResponseHead(status, reason.decode("latin-1"), tuple(headers), tuple(c for c in under if c != b"identity"))
        self.head = head
        if self._no_body or status in (204, 304):
            self._move(Phase.DONE)
        elif codings:
            if not chunked:  # RFC 9112 6.3: the length is unknown, read until close
                self.keep_alive = False
                self._move(Phase.UNTIL_CLOSE)
            else:
                self._move(Phase.CHUNK_SIZE)
        elif lengths:
            self._left = int(lengths.pop())
            self._move(Phase.LENGTH if self._left else Phase.DONE)
        else:
            self.keep_alive = False
            self._move(Phase.UNTIL_CLOSE)

    def _read_chunked(self, data: bytes) -> None:
        pos, end, body = 0, len(data), self._body
        phase = self.phase
        while pos < end:
            if phase is Phase.CHUNK_SIZE:
                line = _CHUNK_LINE.match(data, pos)
                if line is None:
                    if data.find(b"\r\n", pos) >= 0:
                        raise ProtocolError("an invalid chunk size")
                    if end - pos > MAX_CHUNK_LINE_BYTES:
                        raise ProtocolError("a chunk size line is too long")
                    break
                size = int(line.group(1), 16)
                pos = line.end()
                if not size:
                    phase = Phase.TRAILERS
                    self._move(phase)
                elif end - pos >= size + 2:  # the whole chunk is here: no need to leave CHUNK_SIZE
                    after = pos + size
                    if data[after : after + 2] != b"\r\n":
                        raise ProtocolError("a chunk's data did not end with CRLF")
                    body.append(data[pos:after])
                    pos = after + 2
                else:
                    self._left = size
                    phase = Phase.CHUNK_DATA
                    self._move(phase)
            elif phase is Phase.CHUNK_DATA:
                take = min(self._left, end - pos)
                body.append(data[pos : pos + take] if take != end or pos else data)
                pos += take
                self._left -= take
                if self._left:
                    break
                self._move(Phase.CHUNK_END)
                phase = Phase.CHUNK_END
            elif phase is Phase.CHUNK_END:
                if end - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("a chunk's data did not end with CRLF")
                pos += 2
                self._move(Phase.CHUNK_SIZE)
                phase = Phase.CHUNK_SIZE
            elif phase is Phase.TRAILERS:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > MAX_HEAD_BYTES:
                        raise ProtocolError("the trailer section is too large")
                    break
                if eol == pos:  # the empty line: the message is complete
                    pos += 2
                    self._move(Phase.DONE)
                    if pos < end:
                        raise ProtocolError("bytes after the end of the response")
                    return
                if _HEADER_LINE.fullmatch(data, pos, eol) is None:
                    raise ProtocolError("a malformed trailer line")
                pos = eol + 2  # a trailer field: checked, not used
        self._buf = data[pos:] if pos < end else b""


def _values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]
