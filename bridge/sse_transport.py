"""Our own protocol over Server-Sent Events, for networks where WebSockets fail.

Theory of operation. An SSE session is what a WebSocket is to bridge/server.py: one connection
on the relay (an `SseLink`), carrying the same JSON frames (bridge/codec.py) both ways, only
split over plain HTTP requests:

    POST   /sse               opens a session (key: Authorization Bearer); 201 {"session": ID}
    GET    /sse/ID            the server frames, as an SSE stream (EventSource)
    POST   /sse/ID            one client frame (start, cancel, modify, ping, resume, close); 202
    DELETE /sse/ID[?end=1]    closes it: with end=1 the session ends (WebSocket close 1000),
                              otherwise it is only detached and stays resumable (a drop)

Each server frame is one SSE event whose `id` is its position in the session (1, 2, ...). The
bridge keeps the frames it has written until a later GET says the client has them: a
reconnecting EventSource sends `Last-Event-ID` (or, for a client that opens a new EventSource,
`?last_event_id=`), and the stream resumes after that position, nothing lost or repeated. A GET
asking for frames already dropped (the session held more than `max_pending_bytes`) gets an
`expired` error and a `close` event: the client then resumes the session through the protocol,
as after a dropped WebSocket. A session with no GET attached for `reattach_timeout_s` is
detached from the server (its streams stay resumable for the server's grace period).

The ID is an unguessable capability, issued to the caller that presented the key; it is not the
key, and it is the only thing an EventSource (which cannot set headers) can carry.

The end of a session from the server's side (refused, expired, ...) is the protocol's error
frame, then `event: close` with the WebSocket close code the WebSocket path would use.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable

import orjson
from aiohttp import web

from llmproxy.v1 import llmproxy_pb2 as pb
from bridge.headers import one_header
from bridge.codec import FrameError, decode_client_frame, encode_error, encode_server_frame
from bridge.openai_chat import ApiError
from bridge.pool import RelayPool

log = logging.getLogger("llmproxy.bridge.sse")

# Why a session ends (a proto ErrorCode) -> the close code the WebSocket path sends
# (bridge/server.py END_CLOSE; repeated here: that module is the WebSocket side).
END_CLOSE: dict[int, int] = {
    pb.ERROR_CODE_UNAVAILABLE: 1013,
    pb.ERROR_CODE_RATE_LIMITED: 1013,
    pb.ERROR_CODE_OVERLOADED: 1013,
    pb.ERROR_CODE_UNAUTHENTICATED: 1008,
    pb.ERROR_CODE_INVALID_REQUEST: 1008,
    pb.ERROR_CODE_EXPIRED: 1012,
    pb.ERROR_CODE_RESUMED_ELSEWHERE: 4001,
    pb.ERROR_CODE_SLOW_READER: 4002,
}
RETRYABLE = frozenset({pb.ERROR_CODE_UNAVAILABLE, pb.ERROR_CODE_RATE_LIMITED, pb.ERROR_CODE_OVERLOADED, pb.ERROR_CODE_SLOW_READER})
KEEPALIVE_S = 15.0  # a comment on an idle stream, so intermediaries do not cut it
RETRY_MS = 500  # how soon an EventSource reconnects (the SSE `retry` field)


class SseLink:
    """One SSE session on the relay: the `Link` of bridge/relay.py."""

    def __init__(self, sid: str, opening: pb.RelayOpen, max_pending_bytes: int) -> None:
        self.sid = sid
        self.opening = opening
        self.conn = 0
        self.ended_code: int | None = None  # set once the session is over
        self.attached: asyncio.Event | None = None  # the GET writing now (set to stop it)
        self.detached_since = time.monotonic()
        self._log: deque[tuple[int, bytes]] = deque()  # (position, event) not yet known received
        self._log_bytes = 0
        self._next = 1
        self._dropped_through = 0  # positions up to this were dropped unacknowledged
        self._max_pending = max_pending_bytes
        self.wake = asyncio.Event()

    # -- the relay's side -------------------------------------------------------------------------

    def deliver(self, frame: pb.ServerFrame) -> None:
        try:
            data = encode_server_frame(frame)
        except Exception:
            log.error("cannot encode a server frame; ending the SSE session", exc_info=True)
            self.ended(pb.ERROR_CODE_INTERNAL, "the bridge could not encode a frame from the server")
            return
        self._append(data)

    def flush(self) -> None:
        self.wake.set()

    def ended(self, code: int, message: str) -> None:
        if self.ended_code is not None:
            return
        self._append(encode_error(code, message, retryable=code in RETRYABLE))
        self.ended_code = END_CLOSE.get(code, 1011)
        self.wake.set()

    def relay_lost(self) -> None:
        # The client resumes the session through the protocol, as after a dropped WebSocket.
        self.ended(pb.ERROR_CODE_UNAVAILABLE, "the connection to the llmproxy server was lost")

    def reopen(self) -> pb.RelayOpen:
        return self.opening

    def reply(self, data: bytes) -> None:
        """A frame of the bridge's own (an error about a client frame)."""
        self._append(data)
        self.wake.set()

    # -- the log ----------------------------------------------------------------------------------

    def _append(self, data: bytes) -> None:
        if self.ended_code is not None:
            return
        event = b"id: %d\ndata: " % self._next + data + b"\n\n"
        self._log.append((self._next, event))
        self._log_bytes += len(event)
        self._next += 1
        while self._log_bytes > self._max_pending and len(self._log) > 1:
            pos, old = self._log.popleft()  # the client can no longer resume through this bridge's log
            self._log_bytes -= len(old)
            self._dropped_through = pos

    def received_through(self, last_id: int) -> bool:
        """The client has every frame up to `last_id`: forget them. False if it asks for frames
        already dropped (or never sent)."""
        if last_id < self._dropped_through or last_id >= self._next:
            return False
        while self._log and self._log[0][0] <= last_id:
            self._log_bytes -= len(self._log.popleft()[1])
        self._dropped_through = last_id  # an earlier position can no longer be served
        return True

    def events_after(self, position: int) -> tuple[bytes, int]:
        """The events after `position`, joined, and the new position."""
        out = [event for pos, event in self._log if pos > position]
        return b"".join(out), self._next - 1


def close_event(code: int) -> bytes:
    return b"event: close\ndata: " + orjson.dumps({"code": code}) + b"\n\n"


class SseTransport:
    """The /sse routes, on the bridge's HTTP server."""

    def __init__(
        self,
        relay: RelayPool,
        origin_allowed: Callable[[str], bool],
        credential_of: Callable[[web.Request], str],
        max_frame_bytes: int,
        max_messages: int,
        max_pending_bytes: int,
        reattach_timeout_s: float,
    ) -> None:
        self._relay = relay
        self._origin_allowed = origin_allowed
        self._credential_of = credential_of
        self._max_frame_bytes = max_frame_bytes
        self._max_messages = max_messages
        self._max_pending = max_pending_bytes
        self._reattach_timeout_s = reattach_timeout_s
        self._links: dict[str, SseLink] = {}

    def routes(self, app: web.Application) -> None:
        app.router.add_route("OPTIONS", "/sse", self._preflight)
        app.router.add_route("OPTIONS", "/sse/{sid}", self._preflight)
        app.router.add_post("/sse", self._open)
        app.router.add_get("/sse/{sid}", self._events)
        app.router.add_post("/sse/{sid}", self._frame)
        app.router.add_delete("/sse/{sid}", self._close)

    def __len__(self) -> int:
        return len(self._links)

    # -- CORS: pages of allowed origins may use the transport (the WebSocket origin policy) ------

    def _cors(self, request: web.Request) -> dict[str, str] | None:
        """CORS headers for the request's origin; None if its Origin is not allowed."""
        origins = request.headers.getall("Origin", [])
        if not origins:
            return {}
        if len(origins) > 1 or not self._origin_allowed(origins[0]):
            log.warning("refused an SSE request from Origin %r (allow it with --allowed-origin)", origins[0][:200])
            return None
        return {"Access-Control-Allow-Origin": origins[0], "Vary": "Origin"}

    async def _preflight(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        if cors is None:
            return web.Response(status=403, text="origin not allowed\n")
        return web.Response(
            status=204,
            headers={
                **cors,
                "Access-Control-Allow-Methods": "GET, POST, DELETE",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
                "Access-Control-Max-Age": "600",
            },
        )

    def _refused(self, status: int, code: int, message: str, cors: dict[str, str] | None) -> web.Response:
        return web.Response(status=status, body=encode_error(code, message), content_type="application/json", headers=cors or {})

    # -- routes ------------------------------------------------------------------------------------

    async def _open(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        if cors is None:
            return self._refused(403, pb.ERROR_CODE_UNAUTHENTICATED, "origin not allowed", None)
        try:
            credential = self._credential_of(request)
        except ApiError as exc:  # a malformed key
            return self._refused(401, pb.ERROR_CODE_UNAUTHENTICATED, exc.message, cors)
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        opening = pb.RelayOpen(
            credential=credential,
            origin=request.headers.get("Origin", ""),
            peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "",
            traceparent=one_header(request.headers.getall("traceparent", [])),
            api="sse",
        )
        sid = secrets.token_urlsafe(24)
        link = SseLink(sid, opening, self._max_pending)
        link.conn = self._relay.open(link, opening)
        self._links[sid] = link
        self._watch(link)
        return web.Response(status=201, body=orjson.dumps({"session": sid}), content_type="application/json", headers=cors)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        cors = self._cors(request)
        link = self._links.get(request.match_info["sid"])
        if cors is None or link is None:
            return web.Response(status=404 if cors is not None else 403, text="no such SSE session\n", headers=cors or {})
        raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or "0"
        try:
            last_id = int(raw)
        except ValueError:
            return web.Response(status=400, text="Last-Event-ID must be an integer\n", headers=cors)
        response = web.StreamResponse(
            status=200,
            headers={**cors, "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        await response.prepare(request)
        if not link.received_through(last_id):
            await response.write(
                b"data: " + encode_error(pb.ERROR_CODE_EXPIRED, "this SSE stream cannot resume from there; resume the session")
                + b"\n\n" + close_event(END_CLOSE[pb.ERROR_CODE_EXPIRED])
            )
            return response
        if link.attached is not None:
            link.attached.set()  # a newer GET takes over; the older one ends
        stop = link.attached = asyncio.Event()
        position = last_id
        try:
            await response.write(b"retry: %d\n\n" % RETRY_MS)
            while not stop.is_set():
                data, position = link.events_after(position)
                if data:
                    await response.write(data)
                if link.ended_code is not None:
                    await response.write(close_event(link.ended_code))
                    self._forget(link)
                    break
                link.wake.clear()
                waiter = asyncio.ensure_future(link.wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    done, _ = await asyncio.wait({waiter, stopper}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()
                if not done:
                    await response.write(b": keepalive\n\n")
        except ConnectionError:
            pass  # the EventSource reconnects with Last-Event-ID, or the watchdog detaches
        finally:
            if link.attached is stop:
                link.attached = None
                link.detached_since = time.monotonic()
        return response

    async def _frame(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        link = self._links.get(request.match_info["sid"])
        if cors is None or link is None:
            return web.Response(status=404 if cors is not None else 403, text="no such SSE session\n", headers=cors or {})
        try:
            text = (await request.read()).decode("utf-8")
        except UnicodeDecodeError:
            text = "\ufffd"  # not JSON: the codec says so
        try:
            frame = decode_client_frame(text, self._max_frame_bytes, self._max_messages)
        except FrameError as exc:
            link.reply(encode_error(exc.code, exc.message, exc.stream_id))
        else:
            self._relay.send(link.conn, frame)
        return web.Response(status=202, headers=cors)

    async def _close(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        link = self._links.get(request.match_info["sid"])
        if cors is None or link is None:
            return web.Response(status=404 if cors is not None else 403, text="no such SSE session\n", headers=cors or {})
        self._relay.close(link.conn, end_session=request.query.get("end") == "1")
        self._forget(link)
        return web.Response(status=204, headers=cors)

    # -- lifetime ----------------------------------------------------------------------------------

    def _forget(self, link: SseLink) -> None:
        self._relay.close(link.conn, end_session=False)  # no-op if the relay already let it go
        if self._links.pop(link.sid, None) is not None:
            if link.ended_code is None:
                link.ended_code = 1000
            link.wake.set()
            if link.attached is not None:
                link.attached.set()

    def _watch(self, link: SseLink) -> None:
        """Detaches a session whose EventSource has been gone for `reattach_timeout_s`."""

        def check() -> None:
            if self._links.get(link.sid) is not link:
                return
            if link.attached is None and time.monotonic() - link.detached_since >= self._reattach_timeout_s:
                log.info("an SSE session had no event stream for %.0fs; detaching it", self._reattach_timeout_s)
                self._relay.close(link.conn, end_session=False)
                self._forget(link)
                return
            asyncio.get_running_loop().call_later(self._reattach_timeout_s / 2, check)

        asyncio.get_running_loop().call_later(self._reattach_timeout_s / 2, check)
