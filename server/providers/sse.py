"""An incremental Server-Sent Events decoder: bytes in, `SSEEvent`s out, no I/O.

Theory of operation. `decode(chunk)` accepts the response body in arbitrary pieces (split
anywhere: inside a line, inside a CRLF pair, inside a multi-byte UTF-8 character) and returns the
events completed by that piece; `flush()` ends the stream. It follows the WHATWG "event stream
interpretation" (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

- lines end in LF, CRLF or a lone CR; a leading UTF-8 BOM is dropped;
- `:` starts a comment (providers send them as keep-alives);
- `data:` lines accumulate, joined by LF; `event:` sets the type; `id:` sets the last event id
  (ignored when it contains NUL); `retry:` takes digits only; unknown fields are ignored;
- a blank line dispatches the event, unless no `data` line was seen.

Everything is done on bytes and decoded once per field, so a UTF-8 character split between two
chunks cannot be garbled (LF and CR bytes never occur inside a multi-byte sequence).

One departure: at `flush()` a pending event (its lines received, its closing blank line not) is
dispatched instead of discarded. Anthropic's own SDK fixtures end that way, and a body that was
cut mid-event shows up downstream as a missing finish or an undecodable payload, both errors.

Size caps. A line longer than `max_line_bytes` (an unterminated one included) and an event
whose data is longer than `max_event_bytes` raise `EventTooLarge`: an upstream that never sends
a line end would otherwise grow the buffer without bound. The defaults are far above any
provider's event (a Gemini event with an inline image is a few MiB).

This is the hot path of every token: each chunk is split once (`bytes.splitlines`, which knows
exactly LF, CRLF and CR) and each `data:` line costs one slice comparison. The caps cost one
length check per chunk and one per event; the lines of a chunk are measured one by one only
when the chunk itself is longer than a line may be.
"""

from __future__ import annotations

from typing import NamedTuple

from server.errors import EventTooLarge

_BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_EVENT_BYTES = 16 * 1024 * 1024


class SSEEvent(NamedTuple):
    """One dispatched event. `event` is "message" when the stream named no type.

    A NamedTuple rather than a frozen dataclass: one is made per token, and a frozen
    dataclass's `__init__` (one `object.__setattr__` per field) measured six times slower."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder; one per response body. Not thread-safe, not reusable."""

    __slots__ = ("_tail", "_skip_lf", "_started", "_data", "_event", "_last_id", "_retry", "_max_line", "_max_event")

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max_line = max_line_bytes
        self._max_event = max_event_bytes
        self._tail = b""  # an unterminated line carried to the next chunk
        self._skip_lf = False  # the last chunk ended in CR: a LF opening the next one pairs with it
        self._started = False  # the BOM check has been done
        self._data: list[bytes] = []
        self._event = "message"
        self._last_id = ""
        self._retry: int | None = None

    def decode(self, chunk: bytes) -> list[SSEEvent]:
        """Feeds one piece of the body; returns the events it completed (often none). Raises
        `EventTooLarge` when a line or an event passes its cap."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if not self._started:
            buffered = self._tail + chunk
            if len(buffered) < 3 and _BOM.startswith(buffered):
                self._tail = buffered  # cannot tell yet whether this is a BOM
                return []
            self._started = True
            self._tail = b""
            chunk = buffered[3:] if buffered.startswith(_BOM) else buffered
            if not chunk:
                return []
        if self._tail:
            chunk = self._tail + chunk
        # bytes.splitlines() splits on exactly LF, CRLF and CR, in one pass. A CR at the very end
        # may be the first half of a CRLF: the line it ends is complete either way, and a LF
        # opening the next chunk must not count as a second line end.
        last = chunk[-1]
        lines = chunk.splitlines()
        if last == 0x0A:
            self._tail = b""
        elif last == 0x0D:
            self._tail = b""
            self._skip_lf = True
        else:
            self._tail = lines.pop()
        if len(chunk) > self._max_line and max(map(len, lines), default=0) > self._max_line or len(self._tail) > self._max_line:
            raise EventTooLarge(f"the upstream sent an event-stream line over {self._max_line} bytes")
        return self._process(lines) if lines else []

    def flush(self) -> list[SSEEvent]:
        """Ends the body: processes an unterminated last line and dispatches a pending event."""
        lines = [self._tail] if self._tail else []
        self._tail = b""
        lines.append(b"")
        return self._process(lines)

    def _process(self, lines: list[bytes]) -> list[SSEEvent]:
        # One loop, dispatch inlined: this runs for every token (measured: a method call per
        # event cost as much as the rest of the loop).
        events: list[SSEEvent] = []
        data = self._data
        for line in lines:
            if line[:5] == b"data:":  # the common case first
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif not line:
                if data:
                    payload = data[0] if len(data) == 1 else b"\n".join(data)
                    if len(payload) > self._max_event:
                        raise EventTooLarge(f"the upstream sent an event over {self._max_event} bytes")
                    events.append(SSEEvent(payload.decode("utf-8", "replace"), self._event, self._last_id, self._retry))
                    data = []
                self._event = "message"
            elif line[0] != 0x3A:  # not a ':' comment
                name, colon, value = line.partition(b":")
                if colon and value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    data.append(value)
                elif name == b"event":
                    self._event = value.decode("utf-8", "replace") if value else "message"
                elif name == b"id":
                    if b"\x00" not in value:
                        self._last_id = value.decode("utf-8", "replace")
                elif name == b"retry":
                    if value.isdigit():
                        self._retry = int(value)
        if data and sum(map(len, data)) + len(data) - 1 > self._max_event:  # an event still open at the chunk's end
            raise EventTooLarge(f"the upstream sent an event over {self._max_event} bytes")
        self._data = data
        return events
