"""Keep-alive HTTP/1.1 connections to one upstream origin, driving `h1.ResponseReader`.

Theory of operation. `OriginPool.open(request)` takes an idle connection (the most recently
used one that is still open and younger than the keep-alive expiry) or connects a new one, writes
the request in one go, and waits for the response head; it returns an `H1Exchange` whose
`read()` gives the decoded body bytes as they arrive and b"" at the end. The protocol object
feeds every socket read straight into the reader and wakes the one waiting task: one future per
read, no streams or generators in between. A body that is not read stops the socket being read
past 256 KiB (pause_reading), which is the provider's backpressure.

A finished response whose connection may stay open goes back to the pool; `aclose()` before the
end aborts the connection, which is how the provider learns that the client went away (RFC 9112
9.6: an unread body cannot be skipped on HTTP/1.1). A reused connection that the upstream had
closed while idle fails before any byte of the response arrives; an idempotent request then goes
once more on a new connection, as browsers and httpcore do. A POST does not: the upstream may
have read it whole before the connection broke, and RFC 9112 9.3.1 forbids retrying a
non-idempotent request automatically; the caller (the router, with its retry rules and budget)
decides.

Errors: `Unreachable` (could not connect or the connection failed before a response head; with
`timed_out` when the connect deadline passed) and `BodyLost` (the connection failed or the
framing broke after the head). Cancelling `open()` or `read()` is safe: the connection is aborted
and its slot released.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Callable
from typing import cast

from server.providers.h1 import ProtocolError, ResponseHead, ResponseReader, request_bytes

PAUSE_ABOVE_BYTES = 256 * 1024
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})  # RFC 9110 9.2.2


class Unreachable(Exception):
    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class BodyLost(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One socket; at most one response at a time."""

    __slots__ = ("transport", "reader", "error", "lost", "idle_since", "_waiter", "_paused", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader: ResponseReader | None = None
        self.error: Exception | None = None
        self.lost = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None or self.error is not None:  # bytes nobody asked for: unusable
            self.abort()
            return
        try:
            reader.receive_data(data)
        except ProtocolError as exc:
            self.error = exc
            self.abort()
        else:
            if not self._paused and reader.buffered > PAUSE_ABOVE_BYTES and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        reader = self.reader
        if reader is not None and self.error is None:
            try:
                reader.receive_eof()
            except ProtocolError as error:
                self.error = error
        self._wake()

    # -- for the exchange ------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.lost and self.error is None and self.transport is not None and not self.transport.is_closing()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    async def wait(self) -> None:
        """Until the next socket event (data, EOF or loss)."""
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class H1Exchange:
    """One response being read: `status`, `head`, and `read()` until b""."""

    __slots__ = ("head", "_conn", "_reader", "_release", "_decoder", "_broken", "_ended")

    def __init__(self, conn: _Connection, head: ResponseHead, release: Callable[[_Connection, bool], None]) -> None:
        self.head = head
        self._conn = conn
        assert conn.reader is not None
        self._reader = conn.reader
        self._release = release
        self._decoder: zlib._Decompress | None = None
        self._broken: BodyLost | None = None
        try:
            self._decoder = _decoder_for(head)
        except BodyLost as exc:
            self._broken = exc  # raised by the first read
        self._ended = False

    @property
    def status(self) -> int:
        return self.head.status

    async def read(self) -> bytes:
        """The next decoded body bytes; b"" at the end. Raises `BodyLost`."""
        conn, reader = self._conn, self._reader
        if self._broken is not None:
            self._end(reusable=False)
            raise self._broken
        while True:
            data = reader.body_to_read()
            if data:
                conn.resume()
                if self._decoder is not None:
                    try:
                        data = self._decoder.decompress(data)
                    except zlib.error:
                        raise BodyLost("the upstream sent a corrupt compressed body") from None
                    if not data:
                        continue
                return data
            if reader.complete:
                self._end(reusable=reader.keep_alive and conn.usable)
                return b""
            if conn.error is not None or conn.lost:
                self._end(reusable=False)
                raise BodyLost(str(conn.error or "the connection was lost"))
            try:
                await conn.wait()
            except BaseException:
                self._end(reusable=False)
                raise

    def aclose(self) -> None:
        """Ends the exchange; before the end of the body this aborts the connection."""
        if not self._ended:
            self._end(reusable=self._reader.complete and self._reader.keep_alive and self._conn.usable)

    def _end(self, reusable: bool) -> None:
        if not self._ended:
            self._ended = True
            if not reusable:
                self._conn.abort()
            self._release(self._conn, reusable)


def _decoder_for(head: ResponseHead) -> zlib._Decompress | None:
    """We ask for `identity`; a server that compresses anyway is still understood."""
    coding = (head.get(b"content-encoding") or b"identity").strip().lower()
    if coding in (b"identity", b""):
        return None
    if coding in (b"gzip", b"x-gzip"):
        return zlib.decompressobj(wbits=31)
    if coding == b"deflate":
        return zlib.decompressobj(wbits=15)
    raise BodyLost(f"the upstream used an unsupported content-encoding: {coding.decode('latin-1')}")


class OriginPool:
    """The keep-alive connections to one `scheme://host:port`."""

    def __init__(self, scheme: str, host: str, port: int, ssl_context: ssl.SSLContext | None, max_connections: int, keepalive_expiry_s: float) -> None:
        self._host, self._port = host, port
        self._ssl = ssl_context if scheme == "https" else None
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._expiry_s = keepalive_expiry_s
        self._closed = False

    async def open(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, connect_s: float, pool_s: float) -> H1Exchange:
        """Sends the request; returns once the response head is in. Raises `Unreachable`."""
        if self._closed:
            raise Unreachable("the client is closed")
        payload = request_bytes(method, target, headers, body)
        if self._slots.locked():  # every connection busy: wait for one, bounded
            try:
                await asyncio.wait_for(self._slots.acquire(), pool_s)
            except TimeoutError:
                raise Unreachable("no free connection in time", timed_out=True) from None
        else:
            await self._slots.acquire()  # free: returns at once (wait_for would start a task)
        try:
            for _ in range(2):
                conn = self._idle_connection()
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(connect_s)
                reader = conn.reader = ResponseReader(no_body=method == b"HEAD")
                assert conn.transport is not None
                conn.transport.write(payload)
                try:
                    while reader.head is None:
                        if conn.error is not None or conn.lost:
                            raise Unreachable("the connection closed before the response")
                        await conn.wait()
                except Unreachable:
                    conn.abort()
                    if reused and not reader.received_any and method in IDEMPOTENT:
                        continue  # closed by the upstream while idle: once more, on a new one
                    raise
                except BaseException:
                    conn.abort()
                    raise
                return H1Exchange(conn, reader.head, self._release)
            raise Unreachable("the connection closed before the response")  # pragma: no cover
        except BaseException:
            self._slots.release()
            raise

    def _idle_connection(self) -> _Connection | None:
        idle, now = self._idle, time.monotonic()
        while idle:
            conn = idle.pop()  # the most recent: the least likely to have been closed
            if conn.usable and now - conn.idle_since < self._expiry_s:
                return conn
            conn.abort()
        return None

    async def _connect(self, connect_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_s):
                transport, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise Unreachable("connect timed out", timed_out=True) from None
        except (OSError, ssl.SSLError) as exc:
            raise Unreachable(f"connect failed: {type(exc).__name__}") from None
        conn.transport = transport
        return conn

    def _release(self, conn: _Connection, reusable: bool) -> None:
        self._slots.release()
        conn.reader = None
        if reusable and not self._closed and conn.usable:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)

    def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
