"""What one WebSocket has not taken yet. Sans-I/O.

The bridge never stops reading its relay: the frames of every connection arrive in shared
batches, and one browser that reads slowly must not hold up the others. A frame goes straight to
its WebSocket while the socket takes it; while the socket's send buffer is full, frames wait
here, in order, and token frames of one stream merge into the one still waiting (text appended,
`seq` moved to the last token, `count` raised: the same merge the server does, docs/protocol.md),
so a slow reader gets fewer, larger frames. Any other frame of that stream ends the merge, so
order within a stream holds. `pending_bytes` bounds what is held: the driver cuts a connection
whose outbox stays over its bound (its session stays resumable).

    push(frame)      a server frame for this connection
    take()           everything waiting, encoded once, in order
"""

from __future__ import annotations

from llmproxy.v1 import llmproxy_pb2 as pb
from bridge.codec import encode_server_frame

# Accounting for a non-token frame: its encoded JSON is a few hundred bytes at most, except
# `done`/`error` with timing (about 600); a fixed figure keeps push() free of encoding.
FRAME_BYTES = 512


class _Merge:
    """A token frame still waiting, and the pieces that joined it."""

    __slots__ = ("frame", "pieces", "seq", "count")

    def __init__(self, frame: pb.ServerFrame) -> None:
        token = frame.token
        self.frame = frame
        self.pieces = [token.text]
        self.seq = token.seq
        self.count = token.count or 1


class Outbox:
    __slots__ = ("_items", "_merging", "pending_bytes")

    def __init__(self) -> None:
        self._items: list[pb.ServerFrame | _Merge | bytes] = []
        self._merging: dict[str, _Merge] = {}  # stream id -> its waiting token frame
        self.pending_bytes = 0

    def __bool__(self) -> bool:
        return bool(self._items)

    def push(self, frame: pb.ServerFrame) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "token":
            token = frame.token
            merge = self._merging.get(token.stream_id)
            if merge is not None:
                merge.pieces.append(token.text)
                merge.seq = token.seq
                merge.count += token.count or 1
            else:
                merge = self._merging[token.stream_id] = _Merge(frame)
                self._items.append(merge)
            self.pending_bytes += len(token.text) + 16
            return
        if self._merging and kind is not None:
            self._merging.pop(getattr(frame, kind).stream_id if kind not in _NO_STREAM else "", None)
        self._items.append(frame)
        self.pending_bytes += FRAME_BYTES

    def push_encoded(self, data: bytes) -> None:
        """A frame the bridge made itself (an error about a client frame), already encoded."""
        self._items.append(data)
        self.pending_bytes += len(data)

    def take(self) -> list[bytes]:
        items, self._items = self._items, []
        self._merging.clear()
        self.pending_bytes = 0
        out: list[bytes] = []
        for item in items:
            if type(item) is _Merge:
                frame = item.frame
                if item.count > 1:
                    token = frame.token
                    token.text = "".join(item.pieces)
                    token.seq = item.seq
                    token.count = item.count
                out.append(encode_server_frame(frame))
            elif type(item) is bytes:
                out.append(item)
            else:
                out.append(encode_server_frame(item))  # type: ignore[arg-type]
        return out


# Server frames without a stream id.
_NO_STREAM = frozenset({"pong", "session", "resumed"})
