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
9.6: an unread body cannot be skipped on HTTP/1.1).

A request is written at most once. An idle connection is checked before it is reused: open,
younger than the keep-alive expiry, and with nothing to read (bytes or EOF on an idle
connection mean the upstream closed it; one poll(2), as urllib3 does). Once any byte of a POST
is written it is never sent again, even when the connection closes before an answer: unlike a
browser's GET, a second generation is a second bill. (aiohttp makes the same choice: it retries
only idempotent methods.)

Bodies: chunked, Content-Length or read-to-close framing (h1.py), then the transfer codings
under `chunked` and the Content-Encoding undone (gzip, deflate), with the decoded size capped.

Egress proxy (egress.py): for https:// a CONNECT tunnel to the origin, then TLS inside it; for
http:// absolute-form requests to the proxy. The connections are pooled per origin as usual.

Errors: `Unreachable` (could not connect, TLS or the tunnel failed, or the connection failed
before a response head; with `timed_out` when the connect deadline passed; the message keeps
the reason) and `BodyLost` (the connection failed, the framing broke, or a compressed body was
corrupt or too large after the head). Cancelling `open()` or `read()` is safe: the connection
is aborted and its slot released.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import ssl
import time
import zlib
from collections.abc import Callable
from typing import cast

from server.providers.egress import ProxyEndpoint
from server.providers.h1 import ProtocolError, ResponseHead, ResponseReader, request_bytes

PAUSE_ABOVE_BYTES = 256 * 1024
# What a compressed body may expand to. A streamed answer of 100k tokens is some 30 MB of SSE.
MAX_DECODED_BYTES = 256 * 1024 * 1024


class Unreachable(Exception):
    """No response head. The message says why in words safe to show a client; `detail` is the
    full text of the underlying error, for the log only (it may hold addresses)."""

    def __init__(self, message: str, timed_out: bool = False, detail: str = "") -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.detail = detail


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

    def readable(self) -> bool:
        """Whether the socket has bytes (or EOF) the loop has not read yet: on an idle
        connection that means the upstream closed or broke it (urllib3's
        `is_connection_dropped` check, one poll(2) with no wait)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

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

    def __init__(
        self, conn: _Connection, head: ResponseHead, release: Callable[[_Connection, bool], None], max_decoded_bytes: int = MAX_DECODED_BYTES
    ) -> None:
        self.head = head
        self._conn = conn
        assert conn.reader is not None
        self._reader = conn.reader
        self._release = release
        self._decoder: _Decoder | None = None
        self._broken: BodyLost | None = None
        try:
            self._decoder = _decoder_for(head, max_decoded_bytes)
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
                        data = self._decoder.decode(data)
                    except BodyLost:
                        self._end(reusable=False)
                        raise
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


class _Decoder:
    """Undoes the codings of a body, last applied first, and caps what they may expand to.

    Each decompress call is bounded by what is left under the cap (`max_length`), so a small
    compressed chunk cannot expand into gigabytes in one call (a "zip bomb"): the body is
    refused once its decoded size passes `max_decoded_bytes`."""

    __slots__ = ("_stages", "_left")

    def __init__(self, stages: list[zlib._Decompress], max_decoded_bytes: int) -> None:
        self._stages = stages
        self._left = max_decoded_bytes

    def decode(self, data: bytes) -> bytes:
        """Raises `BodyLost` for a corrupt body or one over the cap."""
        for stage in self._stages:
            try:
                data = stage.decompress(data, self._left + 1)
            except zlib.error:
                raise BodyLost("the upstream sent a corrupt compressed body") from None
            if len(data) > self._left or stage.unconsumed_tail:
                raise BodyLost("the upstream's compressed body expands past the size cap")
        self._left -= len(data)
        return data


def _zlib_for(coding: bytes) -> zlib._Decompress:
    if coding in (b"gzip", b"x-gzip"):
        return zlib.decompressobj(wbits=31)
    if coding == b"deflate":  # RFC 9110 8.4.1.2: the zlib format
        return zlib.decompressobj(wbits=15)
    raise BodyLost(f"the upstream used an unsupported coding: {coding.decode('latin-1')}")


def _decoder_for(head: ResponseHead, max_decoded_bytes: int = 0) -> _Decoder | None:
    """We ask for `identity`; a server that compresses anyway (as a Content-Encoding, or a
    transfer coding under `chunked`, RFC 9112 7) is still understood: the transfer codings are
    undone first, then the content codings, each list last applied first."""
    content = [c for t in (head.get(b"content-encoding") or b"").split(b",") if (c := t.strip().lower()) and c != b"identity"]
    undo = [*reversed(head.transfer_codings), *reversed(content)]  # the outermost first
    if not undo:
        return None
    return _Decoder([_zlib_for(c) for c in undo], max_decoded_bytes or MAX_DECODED_BYTES)


class OriginPool:
    """The keep-alive connections to one `scheme://host:port`, directly or through `proxy`."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        keepalive_expiry_s: float,
        proxy: ProxyEndpoint | None = None,
        max_decoded_bytes: int = MAX_DECODED_BYTES,
    ) -> None:
        self._host, self._port = host, port
        self._ssl = ssl_context if scheme == "https" else None
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._expiry_s = keepalive_expiry_s
        self._closed = False
        self._proxy = proxy
        self._max_decoded_bytes = max_decoded_bytes
        self._authority = _authority(host, port).encode("idna" if not host.isascii() else "ascii")
        # http:// through a proxy: absolute-form targets and the proxy's credentials on every
        # request (RFC 9112 3.2.2); https:// goes through a CONNECT tunnel instead.
        self._forward = proxy is not None and self._ssl is None
        self._forward_headers: list[tuple[bytes, bytes]] = []
        if self._forward and proxy is not None and proxy.authorization:
            self._forward_headers.append((b"proxy-authorization", proxy.authorization.encode("latin-1")))
        self._via = f" through the proxy {proxy.url}" if proxy is not None else ""

    async def open(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, connect_s: float, pool_s: float) -> H1Exchange:
        """Sends the request; returns once the response head is in. Raises `Unreachable`.

        A request is written at most once. A reused connection is checked before writing (open,
        not expired, nothing readable: an idle connection with bytes to read was closed or is
        broken); once any byte of the request is written it is never sent again, even when the
        connection then closes without an answer: the upstream may have read it, and a second
        generation is a second bill. Such a failure is `Unreachable` for the caller to judge."""
        if self._closed:
            raise Unreachable("the client is closed")
        if self._forward:
            target = b"http://" + self._authority + target
            headers = headers + self._forward_headers
        payload = request_bytes(method, target, headers, body)
        if self._slots.locked():  # every connection busy: wait for one, bounded
            try:
                await asyncio.wait_for(self._slots.acquire(), pool_s)
            except TimeoutError:
                raise Unreachable("no free connection in time", timed_out=True) from None
        else:
            await self._slots.acquire()  # free: returns at once (wait_for would start a task)
        try:
            conn = self._idle_connection()
            reused = conn is not None
            if conn is None:
                conn = await self._connect(connect_s)
            reader = conn.reader = ResponseReader(no_body=method == b"HEAD")
            assert conn.transport is not None
            conn.transport.write(payload)  # from here on, never again (see above)
            try:
                while reader.head is None:
                    if conn.lost and not reader.received_any:
                        raise Unreachable(f"the {'reused ' if reused else ''}connection closed before the response")
                    if conn.error is not None:
                        raise Unreachable(f"the response broke HTTP/1.1: {conn.error}")
                    if conn.lost:
                        raise Unreachable("the connection closed before the response head ended")
                    await conn.wait()
            except BaseException:
                conn.abort()
                raise
            return H1Exchange(conn, reader.head, self._release, self._max_decoded_bytes)
        except BaseException:
            self._slots.release()
            raise

    def _idle_connection(self) -> _Connection | None:
        idle, now = self._idle, time.monotonic()
        while idle:
            conn = idle.pop()  # the most recent: the least likely to have been closed
            if conn.usable and now - conn.idle_since < self._expiry_s and not conn.readable():
                return conn
            conn.abort()
        return None

    async def _connect(self, connect_s: float) -> _Connection:
        """A new connection (TLS included; through the proxy's tunnel when there is one).
        Raises `Unreachable` whose message says why (safe to show: no addresses) and whose
        `detail` is the full exception text (for the log)."""
        loop = asyncio.get_running_loop()
        proxy, tls = self._proxy, self._ssl
        tunnel = proxy is not None and tls is not None
        host, port = (proxy.host, proxy.port) if proxy is not None else (self._host, self._port)
        made: list[_Connection] = []

        def protocol() -> _Connection:
            made.append(_Connection(loop))
            return made[-1]

        step = "connect"
        try:
            async with asyncio.timeout(connect_s):
                transport, conn = await loop.create_connection(
                    protocol, host, port, ssl=None if tunnel else tls, server_hostname=self._host if tls is not None and not tunnel else None
                )
                conn.transport = transport
                if tunnel:
                    assert proxy is not None and tls is not None
                    step = "tunnel"
                    await self._open_tunnel(conn, proxy)
                    step = "TLS"
                    conn.transport = await loop.start_tls(conn.transport, conn, tls, server_hostname=self._host)
        except TimeoutError:
            for conn in made:
                conn.abort()
            raise Unreachable(f"{step} timed out after {connect_s:g}s{self._via}", timed_out=True) from None
        except (OSError, ssl.SSLError) as exc:
            for conn in made:
                conn.abort()
            raise Unreachable(f"{describe_failure(exc)}{self._via}", detail=str(exc)) from None
        except BaseException:
            for conn in made:
                conn.abort()
            raise
        return conn

    async def _open_tunnel(self, conn: _Connection, proxy: ProxyEndpoint) -> None:
        """CONNECT host:port through `proxy` (RFC 9110 9.3.6); returns once it answered 2xx."""
        authority = self._authority
        request = [b"CONNECT ", authority, b" HTTP/1.1\r\nHost: ", authority, b"\r\n"]
        if proxy.authorization:
            request += [b"Proxy-Authorization: ", proxy.authorization.encode("latin-1"), b"\r\n"]
        request.append(b"\r\n")
        reader = conn.reader = ResponseReader(no_body=True)  # a 2xx to CONNECT has no body
        assert conn.transport is not None
        conn.transport.write(b"".join(request))
        while reader.head is None:
            if conn.error is not None or conn.lost:
                raise Unreachable(f"the proxy {proxy.url} closed the connection before answering CONNECT", detail=str(conn.error or ""))
            await conn.wait()
        conn.reader = None
        head = reader.head
        if not 200 <= head.status < 300:
            raise Unreachable(f"the proxy {proxy.url} refused the tunnel: {head.status} {head.reason}")

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


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_failure(exc: BaseException) -> str:
    """Why a connect or TLS handshake failed, in words safe to show a client: the kind of
    failure and the system's or OpenSSL's reason, never an address."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or type(exc).__name__}"
    if isinstance(exc, socket.gaierror):
        return f"name resolution failed: {exc.strerror or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.errno:  # asyncio's own strerror holds the address
        return f"connect failed: {os.strerror(exc.errno)}"
    return f"connect failed: {type(exc).__name__}"
