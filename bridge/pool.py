"""One relay per server: a bridge that relays to several servers (`--grpc-target a,b,...`).

Theory of operation. A `RelayPool` holds one `RelayLink` (bridge/relay.py) per server, each its
own channel and its own long-lived `Relay` call, and offers the WebSocket, SSE and HTTP sides the
same calls a single `RelayLink` does (`open`, `send`, `close`, `forget`), so they do not know
how many servers there are. Connection numbers come from one counter shared by the links, so a
connection keeps its number wherever it is carried; the pool remembers which link carries it.

- A new connection goes to the ready link (its call is up) carrying the fewest connections; when
  none is ready, to the least loaded of all, where it waits like on a single relay.
- When a link's call fails, each of its connections moves to the least loaded ready link, with
  the frames it had queued, and is re-opened there by resuming its session (`RelayOpen.resume`),
  exactly as a single link re-attaches on its own new call. Through another server that works
  when the servers share sessions (`--store redis://...`); otherwise that server answers EXPIRED
  and the connection ends with that typed error, as after a restart. When no link is ready, the
  connections stay and follow whichever link comes up first (their own, re-opened, or another).
- With one server the pool is one link: behaviour is exactly that link's.

Cost: frames from the servers go from each link's reader straight to the connection, as before.
A client frame costs one dict lookup more (which link carries the connection).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import grpc

from llmproxy.v1 import llmproxy_pb2 as pb
from bridge.relay import Link, RelayLink


def parse_targets(value: str) -> tuple[str, ...]:
    """`host:p1,host:p2` -> its targets, in order, duplicates dropped. Raises ValueError when
    there is none or one is empty."""
    targets = tuple(dict.fromkeys(t.strip() for t in value.split(",")))
    if not targets or any(not t for t in targets):
        raise ValueError(f"--grpc-target: expected host:port[,host:port...], got {value!r}")
    return targets


class RelayPool:
    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        relay_token: str,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
    ) -> None:
        if not channels:
            raise ValueError("a relay pool needs at least one channel")
        numbers = itertools.count(1)
        self.links: tuple[RelayLink, ...] = tuple(
            RelayLink(c, relay_token, retry_initial_s, retry_max_s, numbers=numbers, on_change=self._changed) for c in channels
        )
        self._carrier: dict[int, RelayLink] = {}  # connection number -> the link carrying it
        self.moved = 0  # connections moved to another link after their link's call failed
        self.opened = asyncio.Event()  # set once any link is up

    # -- the state the bridge reports ---------------------------------------------------------------

    @property
    def up(self) -> bool:
        """At least one link is up (`/readyz`)."""
        return any(link.up for link in self.links)

    @property
    def calls_opened(self) -> int:
        return sum(link.calls_opened for link in self.links)

    def __len__(self) -> int:
        return len(self._carrier)

    def channel(self) -> grpc.aio.Channel:
        """A channel to a server whose relay is up (the first one when none is), for the bridge's
        own unary and server-streaming calls (ListModels, WatchStats)."""
        return next((link.channel for link in self.links if link.up), self.links[0].channel)

    def carrier(self, conn: int) -> RelayLink | None:
        return self._carrier.get(conn)

    # -- what the WebSocket, SSE and HTTP sides call (the RelayLink interface) ---------------------

    def open(self, link: Link, open_: pb.RelayOpen) -> int:
        relay = self._least_loaded()
        conn = relay.open(link, open_)
        self._carrier[conn] = relay
        return conn

    def send(self, conn: int, frame: pb.ClientFrame) -> None:
        relay = self._carrier.get(conn)
        if relay is not None:
            relay.send(conn, frame)

    def close(self, conn: int, end_session: bool) -> None:
        relay = self._carrier.pop(conn, None)
        if relay is not None:
            relay.close(conn, end_session)

    def forget(self, conn: int) -> None:
        relay = self._carrier.pop(conn, None)
        if relay is not None:
            relay.forget(conn)

    async def run(self) -> None:
        """Keeps every link's call open, forever; cancel to stop. A link failing with an error of
        ours (not a gRPC one, which it handles itself) ends them all, for the supervisor."""
        async with asyncio.TaskGroup() as group:
            for link in self.links:
                group.create_task(link.run())

    # -- moving connections -------------------------------------------------------------------------

    def _least_loaded(self) -> RelayLink:
        ready = [link for link in self.links if link.up]
        return min(ready or self.links, key=len)

    def _changed(self, relay: RelayLink) -> None:
        """A link came up or its call ended: connections waiting on a link with no call go to the
        ready links."""
        if relay.up:
            self.opened.set()
        if not any(link.up for link in self.links):
            return  # nowhere to go: they wait where they are
        for source in self.links:
            if source.up or source.calling or not len(source):
                continue
            for conn, link, frames in source.release():
                target = self._least_loaded()
                target.adopt(conn, link, frames)
                self._carrier[conn] = target
                self.moved += 1
