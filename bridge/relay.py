"""The bridge's side of the `Relay` RPC: every client connection over one gRPC call.

Theory of operation. `RelayLink` owns one long-lived `Relay` call to the server. Client
connections register a `Link` (the WebSocket side, bridge/server.py) and get a connection number;
their frames are queued as entries of the current batch, and one writer sends the batch once the
loop turn that queued them is over (a lone frame goes at once, a burst is one message; no timer).
The reader never waits for a client: each entry is handed to its link (`deliver`), which sends
it to its socket or holds it in its own bounded outbox (bridge/outbox.py), and each link that
got frames from one batch flushes once (`flush`), so one socket write carries them all.

When the call fails (the server went away, the TCP connection was cut), every link is told
(`relay_lost`) and the link re-opens the call with backoff. On the new call each link is opened
again (`reopen`): with its session and the last `seq` it received per stream, so the server
resumes the session on the client's behalf and replays exactly what the bridge missed; the
client sees only a pause. A link whose session cannot be resumed is ended by the server
(EXPIRED); a link that has waited `reattach_timeout_s` for the server is failed (UNAVAILABLE) by
the bridge's watchdog.

Frames a client sent while the relay was down wait in the batch and go out after the re-opens.
Frames already written to a call that then failed may be lost with it (a `start` is sent again
if the server does not know its stream; see `Link.reattached`).

Several servers (bridge/pool.py): a bridge may hold one `RelayLink` per server. Their connection
numbers then come from one shared counter, so a connection keeps its number when the pool moves
it, with its queued frames (`release`, `adopt`), from a link whose call failed to one that is up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc

log = logging.getLogger("llmproxy.bridge.relay")

# A batch is closed once its client frames reach this size: the server accepts messages up to
# 8 MiB, and one bridge may carry many clients each sending frames of up to --max-frame-bytes.
MAX_BATCH_BYTES = 4 * 1024 * 1024


class Link(Protocol):
    """A client connection carried by the relay."""

    def deliver(self, frame: pb.ServerFrame) -> None:
        """A frame for the client, in order. Must not block."""

    def flush(self) -> None:
        """The batch is over: write what `deliver` gathered."""

    def ended(self, code: int, message: str) -> None:
        """The server ended the connection (refused, resumed elsewhere, expired)."""

    def relay_lost(self) -> None:
        """The call failed; `reopen` follows when a new one is up."""

    def reopen(self) -> pb.RelayOpen:
        """The `open` entry for a new call (with `resume` once the link has a session)."""


class RelayLink:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        relay_token: str,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
        numbers: Iterator[int] | None = None,
        on_change: Callable[[RelayLink], None] | None = None,
    ) -> None:
        self.channel = channel
        self._stub = pb_grpc.RelayStub(channel)
        self._metadata = (("authorization", f"Bearer {relay_token}"),)
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._links: dict[int, Link] = {}
        self._numbers = numbers if numbers is not None else itertools.count(1)  # shared in a pool
        self._on_change = on_change  # told when the call comes up and when it ends (bridge/pool.py)
        self._batch = pb.RelayUp()
        self._batch_bytes = 0  # client frames' sizes in the current batch
        self._full: list[pb.RelayUp] = []  # batches closed at MAX_BATCH_BYTES, oldest first
        self._wake = asyncio.Event()
        self._open = False  # a call is open: entries go out on it
        self.up = False  # ... and the server accepted it (its first, empty, message arrived)
        self.opened = asyncio.Event()  # set once the first call is up (tests, start-up)
        self.calls_opened = 0

    def __len__(self) -> int:
        return len(self._links)

    # -- what the WebSocket side calls -----------------------------------------------------------

    def open(self, link: Link, open_: pb.RelayOpen) -> int:
        """Registers a client connection; returns its number."""
        conn = next(self._numbers)
        self._links[conn] = link
        if self._open:
            self._batch.entries.add(conn=conn, open=open_)
            self._wake.set()
        # else: `reopen` gives its open entry once a call is up
        return conn

    def send(self, conn: int, frame: pb.ClientFrame) -> None:
        if conn in self._links:
            size = frame.ByteSize()
            if self._batch_bytes + size > MAX_BATCH_BYTES and self._batch.entries:
                self._full.append(self._batch)  # stay well under the server's message limit
                self._batch, self._batch_bytes = pb.RelayUp(), 0
            self._batch.entries.add(conn=conn, frame=frame)
            self._batch_bytes += size
            if self._open:
                self._wake.set()

    def close(self, conn: int, end_session: bool) -> None:
        """The client connection is gone (or cut by the bridge). Idempotent."""
        if self._links.pop(conn, None) is not None and self._open:
            self._batch.entries.add(conn=conn, close=pb.RelayClose(end_session=end_session))
            self._wake.set()

    def forget(self, conn: int) -> None:
        """Drops a link without telling the server (it ended the connection itself)."""
        self._links.pop(conn, None)

    # -- moving connections between links (bridge/pool.py) -----------------------------------------

    @property
    def calling(self) -> bool:
        """A call is open (up, or waiting for the server's answer): its links are being re-opened."""
        return self._open

    def release(self) -> list[tuple[int, Link, list[pb.ClientFrame]]]:
        """Gives up every connection, each with the client frames queued for it, oldest first.
        Only between calls (`calling` is False): nothing of theirs is in flight then."""
        assert not self._open, "release only between calls"
        queued: dict[int, list[pb.ClientFrame]] = {conn: [] for conn in self._links}
        for batch in [*self._full, self._batch]:
            for entry in batch.entries:
                if entry.WhichOneof("kind") == "frame" and entry.conn in queued:
                    queued[entry.conn].append(entry.frame)
        released = [(conn, link, queued[conn]) for conn, link in self._links.items()]
        self._links = {}
        self._full, self._batch, self._batch_bytes = [], pb.RelayUp(), 0
        return released

    def adopt(self, conn: int, link: Link, frames: list[pb.ClientFrame]) -> None:
        """Takes over a connection `release`d by another link: it is opened again (resuming its
        session) on this link's call, then its queued frames follow."""
        self._links[conn] = link
        if self._open:
            self._batch.entries.add(conn=conn, open=link.reopen())
            self._wake.set()
        # else: `_begin` opens it with the others once a call is up
        for frame in frames:
            self.send(conn, frame)

    # -- the call --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keeps a call open, forever; cancel to stop."""
        delay = self._retry_initial_s
        while True:
            call = self._stub.Relay(metadata=self._metadata)
            self._begin()
            writer = asyncio.create_task(self._write_loop(call))
            reader = asyncio.create_task(self._read_loop(call))
            try:
                await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                call.cancel()
                reader.cancel()
                writer.cancel()
                outcome = await asyncio.gather(reader, writer, return_exceptions=True)
                was_up = self.up
                self._end()
            if was_up:
                delay = self._retry_initial_s
            for o in outcome:
                if isinstance(o, Exception) and not isinstance(o, grpc.aio.AioRpcError):
                    log.error("relay call failed with an internal error", exc_info=o)
            failure = next((o for o in outcome if isinstance(o, grpc.aio.AioRpcError)), None)
            if failure is not None and failure.code() == grpc.StatusCode.UNAUTHENTICATED:
                log.error("the server refused the relay token (check --relay-token-file on both sides)")
            else:
                why = f"{failure.code().name}: {failure.details()}" if failure is not None else "closed by the server"
                log.warning("relay call ended (%s); re-opening in %.2fs", why, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._retry_max_s)

    def _begin(self) -> None:
        """A new call: every link opens again, then the frames queued meanwhile."""
        self._open = True
        self.calls_opened += 1
        pending, self._full = [*self._full, self._batch], []
        self._batch, self._batch_bytes = pb.RelayUp(), 0
        for conn, link in self._links.items():
            self._batch.entries.add(conn=conn, open=link.reopen())
        for batch in pending:
            for entry in batch.entries:
                if entry.WhichOneof("kind") == "frame" and entry.conn in self._links:
                    self.send(entry.conn, entry.frame)
        self._wake.set()

    def _end(self) -> None:
        if not self._open:
            return
        self._open = self.up = False
        for link in list(self._links.values()):
            link.relay_lost()
        if self._on_change is not None:
            self._on_change(self)

    async def _write_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            while self._full:
                await call.write(self._full.pop(0))
            if self._batch.entries:
                batch, self._batch, self._batch_bytes = self._batch, pb.RelayUp(), 0
                await call.write(batch)

    async def _read_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        links = self._links
        read = call.read
        while True:
            batch = await read()
            if batch is grpc.aio.EOF:
                return
            if not self.up:  # the server's first message (empty): it accepted the call
                self.up = True
                self.opened.set()
                if self._on_change is not None:
                    self._on_change(self)
            touched: dict[Link, None] = {}
            for entry in batch.entries:
                link = links.get(entry.conn)
                if link is None:
                    continue  # closed at this end meanwhile
                try:
                    if entry.WhichOneof("kind") == "frame":
                        link.deliver(entry.frame)
                        touched[link] = None
                    else:
                        del links[entry.conn]
                        touched.pop(link, None)
                        link.ended(entry.ended.code, entry.ended.message)
                except Exception:  # a bug of ours: that connection ends, the others go on
                    self._broken(link)
                    touched.pop(link, None)
            for link in touched:
                try:
                    link.flush()
                except Exception:
                    self._broken(link)

    def _broken(self, link: Link) -> None:
        log.error("a relayed connection failed with an internal error", exc_info=True)
        for number, candidate in list(self._links.items()):
            if candidate is link:
                self.close(number, end_session=False)
        try:
            link.ended(pb.ERROR_CODE_INTERNAL, "internal error in the bridge")
        except Exception:
            log.error("and could not be closed cleanly", exc_info=True)
