"""The WebSocket bridge: browser JSON frames in, one batched relay call per server out.

Every WebSocket is a `WSLink` carried by one of the bridge's `Relay` calls (bridge/relay.py; one
per server, bridge/pool.py, which also moves it to another server when its server goes away). Its
reader decodes each text frame with the codec and queues the proto on the relay (a bad frame is
answered with an error frame and the connection goes on). Frames from the server arrive in the
relay's shared batches and go straight to the socket while it takes them; a socket whose send
buffer is full holds them in its own bounded outbox (bridge/outbox.py, tokens merged), so one
slow browser never slows the relay or any other connection. A WebSocket the client closed with
1000 (normal closure: the app is done) ends the session; any other end (a drop, 1001 on a page
reload) only detaches it: the server keeps its streams generating for the resume grace period,
and the client resumes through any bridge.

A client that stops reading is cut off: websockets' keepalive cannot notice it while data is
flowing (its ping waits behind the full send buffer), so the watchdog aborts any connection
whose socket has been blocked longer than the ping timeout, and a connection is cut at once when
its outbox passes `max_pending_bytes`. Its session stays resumable.

Origins: pages served by the bridge itself and `--allowed-origin` entries may connect; while the
proxy is open on loopback only (the bridge listens on loopback and the server has no client
keys) so may any page served from loopback (`http(s)://localhost|127.0.0.1|[::1]:any port`),
never `null`. Every refused handshake is logged with the origin and the flag that would allow it.

`/stats` is a second WebSocket endpoint: one `WatchStats` subscription per connection, each
snapshot sent as one JSON frame (the dashboard's feed; no keys, no prompt text).

Plain HTTP on the same port: `/healthz` (the process serves), `/readyz` (a relay to a server is
open: 503 otherwise, for load balancers), the demo chat page at `/`, its static files, and the
JavaScript client under `/js/`. Every other path gets the same 404.
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import logging
import mimetypes
import re
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import orjson
from google.protobuf import json_format
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHeader
from websockets.headers import parse_subprotocol
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from bridge.codec import FrameError, decode_client_frame, encode_error, encode_server_frame, encode_token
from bridge.headers import one_header
from bridge.outbox import Outbox
from bridge.pool import RelayPool

log = logging.getLogger("llmproxy.bridge")

# Why a connection ends (a proto ErrorCode) -> WebSocket close code (RFC 6455 7.4.1; 4000-4999
# are ours: 4001 the session was resumed on another connection, 4002 the client read too slowly).
END_CLOSE: dict[int, int] = {
    pb.ERROR_CODE_UNAVAILABLE: 1013,  # try again later
    pb.ERROR_CODE_RATE_LIMITED: 1013,
    pb.ERROR_CODE_OVERLOADED: 1013,
    pb.ERROR_CODE_UNAUTHENTICATED: 1008,  # policy violation
    pb.ERROR_CODE_INVALID_REQUEST: 1008,
    pb.ERROR_CODE_EXPIRED: 1012,  # service restart: the server lost the session
    pb.ERROR_CODE_RESUMED_ELSEWHERE: 4001,
    pb.ERROR_CODE_SLOW_READER: 4002,
}
INTERNAL_CLOSE = 1011
RETRYABLE_ENDS = frozenset({pb.ERROR_CODE_UNAVAILABLE, pb.ERROR_CODE_RATE_LIMITED, pb.ERROR_CODE_OVERLOADED, pb.ERROR_CODE_SLOW_READER})


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    grpc_target: str = "127.0.0.1:50051"
    max_frame_bytes: int = 1 << 20  # larger frames get frame_too_large; 4x this closes (1009)
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    # Kernel send buffer per WebSocket. Linux autotunes it up to megabytes, which a client that
    # stops reading would fill before any send blocks; a fixed cap bounds memory and starts
    # backpressure (merged frames upstream, then the watchdog) within a second.
    send_buffer_bytes: int = 64 * 1024
    allowed_origins: tuple[str, ...] = ()  # exact matches; the bridge's own origin is always allowed
    max_pending_bytes: int = 1 << 20  # what one WebSocket may hold unsent before it is cut
    reattach_timeout_s: float = 10.0  # a connection waits this long for the server, then fails
    relay_token: str = ""  # the secret the server's Relay RPC expects
    static_dirs: dict[str, Path] = field(default_factory=dict)  # URL prefix -> directory
    open_timeout_s: float = 10.0  # the opening handshake must complete within this
    max_messages: int = 1024  # messages per start/modify frame (the server checks again)
    tls_cert: str = ""  # PEM chain and key: serve wss:// and https://
    tls_key: str = ""
    grpc_ca: str = ""  # PEM CA bundle: talk gRPC over TLS to the server, trusting these roots
    grpc_keepalive_ms: int = 30_000  # keepalive ping interval on the channel to the server
    # SO_REUSEPORT: several bridges on one machine share the port and the kernel spreads the
    # connections over them (make cluster). Off by default: a second bridge started by mistake
    # on the same port fails to bind instead of silently taking half the connections.
    reuse_port: bool = False


SUBPROTOCOL = Subprotocol("llmproxy")
BEARER_SUBPROTOCOL_PREFIX = "llmproxy.bearer."
# What a key may look like on the way through: RFC 7230 token characters, bounded. The server
# decides whether it is valid; this only keeps junk out of gRPC metadata.
_CREDENTIAL_RE = re.compile(r"[A-Za-z0-9._~+/=-]{1,256}")
# The server's text for every failed key (server/auth/policy.py UNAUTHENTICATED_MESSAGE).
UNAUTHENTICATED_MESSAGE = "a valid API key is required (authorization: Bearer <key>)"


_SECRET_RES = (
    (re.compile(r"(?i)(authorization:\s*)[^\r\n]*"), r"\1[redacted]"),
    (re.compile(r"(?i)(llmproxy\.bearer\.)[^\s,'\"]*"), r"\1[redacted]"),
    (re.compile(r"(?i)(bearer\s+)[^\s,'\"]+"), r"\1[redacted]"),
    (re.compile(r"(llmp_[0-9a-f]{12}_)[A-Za-z0-9_-]+"), r"\1[redacted]"),  # the key's own shape
)


class RedactCredentials(logging.Filter):
    """Scrubs keys from websockets' own log records (at DEBUG it logs every handshake
    header, Authorization and Sec-WebSocket-Protocol included), their tracebacks too: a header
    the HTTP parser refuses (a bare CR or NUL in `Authorization`) is quoted in the exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        redacted = _redact(text)
        if redacted != text:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[0] is not None:
            # Formatted here, once, and redacted; handlers print exc_text when exc_info is gone.
            record.exc_text = _redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = _redact(record.exc_text)
        return True


def _redact(text: str) -> str:
    for pattern, replacement in _SECRET_RES:
        text = pattern.sub(replacement, text)
    return text


class BadCredential(Exception):
    """The handshake carried a malformed, oversized or ambiguous credential."""


def handshake_credential(headers: Headers) -> str | None:
    """The API key of a handshake: `Authorization: Bearer <key>` (non-browser clients) or a
    `llmproxy.bearer.<key>` entry in `Sec-WebSocket-Protocol` (browsers cannot set headers).
    None when there is none; `BadCredential` when malformed or given more than once. Never
    read from the URL: query strings end up in access logs."""
    found: list[str] = []
    for value in headers.get_all("Authorization"):
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            raise BadCredential(UNAUTHENTICATED_MESSAGE)
        found.append(token)
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        for item in value.split(","):
            item = item.strip()
            if item.startswith(BEARER_SUBPROTOCOL_PREFIX):
                found.append(item[len(BEARER_SUBPROTOCOL_PREFIX) :])
    if not found:
        return None
    if len(found) > 1 or not _CREDENTIAL_RE.fullmatch(found[0]):
        # The server's answer to an unknown key, word for word: a probe cannot tell them apart.
        raise BadCredential(UNAUTHENTICATED_MESSAGE)
    return found[0]


SERVED_SUFFIXES = frozenset({".html", ".js", ".css", ".svg", ".png", ".ico"})


class StaticFiles:
    """Files read once at start-up: no path from a request ever reaches the filesystem. Only
    page assets are served (not package.json, READMEs or type declarations)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self._files: dict[str, tuple[bytes, str]] = {}
        for prefix, directory in dirs.items():
            for path in sorted(directory.glob("*")):
                if path.is_file() and not path.name.startswith(".") and path.suffix in SERVED_SUFFIXES:
                    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                    if ctype.startswith("text/") or ctype.endswith("javascript"):
                        ctype += "; charset=utf-8"
                    self._files[prefix + path.name] = (path.read_bytes(), ctype)
        if "/index.html" in self._files:
            self._files["/"] = self._files["/index.html"]

    def get(self, path: str) -> tuple[bytes, str] | None:
        return self._files.get(path.split("?", 1)[0])


def _select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Selects `llmproxy` when offered (a browser sending its key as `llmproxy.bearer.<key>`
    must offer `llmproxy` too: RFC 6455 4.1 makes it fail unless the server selects one of the
    offered values, and the key itself is never echoed back). Nothing offered: none selected."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "no-store"),
            # websockets closes the TCP connection after a plain-HTTP response; say so, or a
            # client may send its next request on a connection that is already closing.
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback_origin(origin: str) -> bool:
    """An http(s) page served from this machine's loopback, any port (RFC 6454 serialization:
    scheme://host[:port], nothing else). Never `null`."""
    try:
        parts = urlsplit(origin)
        parts.port  # raises on a malformed port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and parts.hostname in LOOPBACK_HOSTS
        and parts.username is None
        and not parts.path
        and not parts.query
        and not parts.fragment
    )


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class WSLink:
    """One WebSocket carried by the relay: the `Link` of bridge/relay.py.

    Keeps what re-attaching needs: the session (from the `session` frame, or the client's own
    successful `resume`), the last `seq` received per live stream, and the `start` frames whose
    stream the server has not confirmed yet."""

    __slots__ = (
        "ws", "conn", "opening", "outbox", "session", "positions", "starts", "reattaching",
        "waiting_since", "blocked_since", "_relay", "_drainer", "_asked", "_ending", "_max_pending", "_ready",
    )

    def __init__(self, ws: ServerConnection, relay: RelayPool, opening: pb.RelayOpen, max_pending: int) -> None:
        self.ws = ws
        self._relay = relay
        self.opening = opening  # credential, origin and peer, for every (re-)open
        self.conn = 0
        self.outbox = Outbox()  # what waits while the socket is blocked
        self._ready: list[bytes] = []  # this batch's frames, encoded, while the socket is not
        self.session: tuple[str, str] | None = None
        self.positions: dict[str, int] = {}
        self.starts: dict[str, pb.ClientFrame] = {}
        self.reattaching = False
        self.waiting_since = time.monotonic()  # waiting for the server since (0: not waiting)
        self.blocked_since = 0.0  # the socket's send buffer has been full since (0: not)
        self._drainer: asyncio.Task[None] | None = None
        self._asked: tuple[str, str] | None = None  # the client's own resume, until answered
        self._ending = False
        self._max_pending = max_pending

    # -- from the client -------------------------------------------------------------------------

    def receive(self, frame: pb.ClientFrame) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "start":
            if frame.start.stream_id:
                self.starts[frame.start.stream_id] = frame
        elif kind == "resume":
            r = frame.resume
            self._asked = (r.session_id, r.resume_token)
            self.positions = {p.stream_id: p.last_seq for p in r.streams}
        self._relay.send(self.conn, frame)

    def reply(self, data: bytes) -> None:
        """A frame of the bridge's own (an error about a client frame), in order with the rest."""
        if self._drainer is None:
            self._ready.append(data)
        else:
            self.outbox.push_encoded(data)
        self.flush()

    # -- from the relay --------------------------------------------------------------------------

    def deliver(self, frame: pb.ServerFrame) -> None:
        if self._ending:
            return
        self.waiting_since = 0.0
        kind = frame.WhichOneof("kind")
        if kind == "token":  # the hot path: track, encode, queue
            token = frame.token
            self.positions[token.stream_id] = token.seq
            if self._drainer is None:
                try:
                    self._ready.append(encode_token(frame))
                except Exception:
                    self._broken()
                return
            self.outbox.push(frame)
            return
        if kind == "session":
            self.session = (frame.session.session_id, frame.session.resume_token)
        elif kind == "resumed":
            if self.reattaching:  # our own resume, on the client's behalf: keep it to ourselves
                self.reattaching = False
                for entry in frame.resumed.streams:
                    start = self.starts.get(entry.stream_id)
                    if start is not None and not entry.known:  # lost with the old call
                        self._relay.send(self.conn, start)
                return
            if self._asked is not None:
                self.session, self._asked = self._asked, None
        elif kind not in ("pong", "heartbeat") and kind is not None:
            inner = getattr(frame, kind)
            sid = inner.stream_id
            if kind == "started":
                self.starts.pop(sid, None)
            if kind == "done" or kind == "error":
                self.starts.pop(sid, None)
                if inner.seq:
                    self.positions.pop(sid, None)
            elif sid and inner.seq:
                self.positions[sid] = inner.seq
        if self._drainer is None:
            try:
                self._ready.append(encode_server_frame(frame))
            except Exception:  # a frame this bridge cannot encode (a newer server, an empty frame)
                self._broken()
        else:
            self.outbox.push(frame)

    def _broken(self) -> None:
        log.error("cannot encode a server frame; closing the connection", exc_info=True)
        self.fail(pb.ERROR_CODE_INTERNAL, "the bridge could not encode a frame from the server")

    def flush(self) -> None:
        """Writes what this batch brought (one socket write for all of it), or, while the socket
        is blocked, leaves it in the outbox."""
        if self._drainer is not None:  # waiting for the socket: the outbox holds it
            if self.over_limit():
                self.cut("too much unsent output")
            return
        ready = self._ready
        if not ready:
            return
        ws = self.ws
        if ws.protocol.state is not State.OPEN:
            ready.clear()
            return
        send_text = ws.protocol.send_text
        for data in ready:
            send_text(data)
        ready.clear()
        ws.send_data()
        if ws.paused:  # the socket's buffer is full: hold what comes next here
            self.blocked_since = time.monotonic()
            self._drainer = asyncio.create_task(self._drain())

    def _send_outbox(self) -> None:
        """The socket can take more: what waited in the outbox goes first, encoded once."""
        try:
            self._ready[:0] = self.outbox.take()
        except Exception:
            self._broken()
            return
        self.flush()

    async def _drain(self) -> None:
        ws = self.ws
        try:
            while True:
                await ws.drain()
                if ws.paused:
                    continue
                self.blocked_since = 0.0
                self._drainer = None
                self._send_outbox()
                return  # a new drainer was started if the socket filled up again
        except (ConnectionError, OSError):
            pass
        finally:
            if self._drainer is asyncio.current_task():
                self._drainer = None

    def over_limit(self) -> bool:
        return self.outbox.pending_bytes > self._max_pending

    def ended(self, code: int, message: str) -> None:
        """The server ended this connection: say why, then close."""
        self.fail(code, message, tell_server=False)

    def fail(self, code: int, message: str, tell_server: bool = True) -> None:
        """Ends the connection with a typed error frame and a close code that says why."""
        if self._ending:
            return
        self._ending = True
        if tell_server:
            self._relay.close(self.conn, end_session=False)
        else:
            self._relay.forget(self.conn)
        if self._drainer is not None:  # the client is not reading: no goodbye can reach it
            self.ws.transport.abort()
            return
        self.outbox = Outbox()  # nothing queued goes out after the error
        self._ready = [encode_error(code, message, retryable=code in RETRYABLE_ENDS)]
        self.flush()
        asyncio.get_running_loop().create_task(self.ws.close(END_CLOSE.get(code, INTERNAL_CLOSE), message[:120]))

    def cut(self, why: str) -> None:
        """Drops a client that stopped reading; its session stays resumable."""
        if self._ending:
            return
        self._ending = True
        log.warning("closing a connection that stopped reading (%s); its session stays resumable", why)
        self._relay.close(self.conn, end_session=False)
        self.ws.transport.abort()

    def relay_lost(self) -> None:
        self.reattaching = self.session is not None
        if not self.waiting_since:
            self.waiting_since = time.monotonic()

    def reopen(self) -> pb.RelayOpen:
        opening = pb.RelayOpen()
        opening.CopyFrom(self.opening)
        if self.session is not None:
            resume = opening.resume
            resume.session_id, resume.resume_token = self.session
            for sid, seq in self.positions.items():
                resume.streams.add(stream_id=sid, last_seq=seq)
            for sid in self.starts.keys() - self.positions.keys():
                resume.streams.add(stream_id=sid, last_seq=0)
        return opening

    def closed(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None


class Bridge:
    def __init__(self, config: BridgeConfig, channels: Sequence[grpc.aio.Channel]) -> None:
        self._config = config
        self.relay = RelayPool(channels, config.relay_token)  # one relay call per server (bridge/pool.py)
        self._static = StaticFiles(config.static_dirs)
        self._origins: frozenset[str] = frozenset(config.allowed_origins)
        self._links: set[WSLink] = set()
        # Pages from any loopback origin may connect while the proxy is open on loopback only:
        # the bridge listens on loopback and the server has no client keys (checked each time
        # the relay opens; until then, strict).
        self._listen_loopback = is_loopback_host(config.host)
        self.keys_required = True
        self._probed_call = 0

    async def watchdog(self) -> None:
        """Cuts connections whose socket has been blocked longer than the ping timeout, fails
        those that waited too long for the server, and checks whether the server needs keys."""
        limit = self._config.ping_timeout_s
        reattach = self._config.reattach_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4, reattach / 4))
            now = time.monotonic()
            for link in list(self._links):
                if link.blocked_since and now - link.blocked_since > limit:
                    link.cut(f"its socket has been blocked for {now - link.blocked_since:.0f}s")
                elif link.waiting_since and now - link.waiting_since > reattach:
                    link.fail(pb.ERROR_CODE_UNAVAILABLE, "the llmproxy server is unavailable")
            if self.relay.up and self.relay.calls_opened != self._probed_call:
                await self._probe_keys()

    async def _probe_keys(self) -> None:
        """Whether the server needs client keys: ListModels without one is refused if so."""
        calls = self.relay.calls_opened
        try:
            await pb_grpc.LLMProxyStub(self.relay.channel()).ListModels(pb.ListModelsRequest(), timeout=5)
            self.keys_required = False
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self.keys_required = True
            else:
                return  # unknown: ask again next time
        self._probed_call = calls

    def allow_own_origin(self, port: int) -> None:
        """Called once the port is known: pages served by this bridge may connect."""
        schemes = ("http", "https") if self._config.tls_cert else ("http",)
        own = {f"{scheme}://{h}:{port}" for h in {self._config.host, "127.0.0.1", "localhost"} for scheme in schemes}
        self._origins = self._origins | own

    def origin_allowed(self, origin: str) -> bool:
        if origin in self._origins:
            return True
        return self._listen_loopback and not self.keys_required and is_loopback_origin(origin)

    async def start(self) -> Server:
        ws_logger = logging.getLogger("websockets.server")
        if not any(isinstance(f, RedactCredentials) for f in ws_logger.filters):
            ws_logger.addFilter(RedactCredentials())
        tls: ssl.SSLContext | None = None
        if self._config.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self._config.tls_cert, self._config.tls_key)
        server = await serve(
            self._handle,
            self._config.host,
            self._config.port,
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            open_timeout=self._config.open_timeout_s,
            ssl=tls,
            logger=ws_logger,
            compression=None,  # permessage-deflate costs throughput and memory (docs/protocol.md)
            max_size=4 * self._config.max_frame_bytes,
            ping_interval=self._config.ping_interval_s,
            ping_timeout=self._config.ping_timeout_s,
            close_timeout=self._config.ping_timeout_s,
            server_header="llmproxy",
            reuse_port=self._config.reuse_port,  # passed on to loop.create_server
        )
        port = next(iter(server.sockets)).getsockname()[1]
        self.allow_own_origin(port)
        return server

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        text = "text/plain; charset=utf-8"
        if path in ("/stream", "/stats"):
            origins = request.headers.get_all("Origin")
            if len(origins) > 1:
                log.warning("refused a WebSocket handshake with %d Origin headers", len(origins))
                return _response(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n", text)
            if origins and not self.origin_allowed(origins[0]):
                log.warning(
                    "refused a WebSocket handshake from Origin %r; to allow it, start the bridge with --allowed-origin %s "
                    "(make run ALLOWED_ORIGINS=...)",
                    origins[0][:200],
                    origins[0][:200],
                )
                return _response(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n", text)
            try:
                for value in request.headers.get_all("Sec-WebSocket-Protocol"):
                    parse_subprotocol(value)
            except InvalidHeader:
                # websockets would answer quoting the header, which may carry a key.
                return _response(http.HTTPStatus.BAD_REQUEST, b"invalid Sec-WebSocket-Protocol header\n", text)
            return None  # go on with the WebSocket handshake
        if request.method not in ("GET", "HEAD"):
            response = _response(http.HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", text)
            response.headers["Allow"] = "GET, HEAD"
        elif path == "/healthz":  # liveness: the process serves
            response = _response(http.HTTPStatus.OK, b"ok\n", text)
        elif path == "/readyz":  # readiness: a relay to a server is open (load balancers)
            if self.relay.up:
                response = _response(http.HTTPStatus.OK, b"ready\n", text)
            else:
                response = _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"no relay to a server is open\n", text)
        elif (found := self._static.get(path)) is not None:
            response = _response(http.HTTPStatus.OK, *found)
        else:
            response = _response(http.HTTPStatus.NOT_FOUND, b"not found\n", text)
        if request.method == "HEAD":  # RFC 9110 9.3.2: the GET's headers, no content
            response = Response(response.status_code, response.reason_phrase, response.headers, b"")
        return response

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        sock = ws.transport.get_extra_info("socket")
        if sock is not None and self._config.send_buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._config.send_buffer_bytes)
        try:
            key = handshake_credential(ws.request.headers)
        except BadCredential as exc:
            await ws.send(encode_error(pb.ERROR_CODE_UNAUTHENTICATED, str(exc)), text=True)
            await ws.close(1008, "unauthenticated")
            return
        if ws.request.path.split("?", 1)[0] == "/stats":
            # The identity goes to the server as call metadata, and nowhere else.
            await self._stats(ws, (("authorization", f"Bearer {key}"),) if key is not None else None)
            return
        peer = ws.remote_address
        opening = pb.RelayOpen(
            credential=key or "",
            origin=ws.request.headers.get("Origin", ""),
            peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "",
            traceparent=one_header(ws.request.headers.get_all("traceparent")),
        )
        link = WSLink(ws, self.relay, opening, self._config.max_pending_bytes)
        link.conn = self.relay.open(link, opening)
        self._links.add(link)
        max_bytes, max_messages = self._config.max_frame_bytes, self._config.max_messages
        try:
            async for message in ws:
                try:
                    frame = decode_client_frame(message, max_bytes, max_messages)
                except FrameError as exc:
                    link.reply(encode_error(exc.code, exc.message, exc.stream_id))
                    continue
                link.receive(frame)
        except ConnectionClosed:
            pass
        finally:
            self._links.discard(link)
            close = ws.protocol.close_rcvd
            self.relay.close(link.conn, end_session=close is not None and close.code == 1000)
            link.closed()

    async def _stats(self, ws: ServerConnection, metadata: tuple[tuple[str, str], ...] | None) -> None:
        """Relays live snapshots until either side goes away."""
        call = pb_grpc.LLMProxyStub(self.relay.channel()).WatchStats(pb.WatchStatsRequest(interval_ms=1000), metadata=metadata)
        try:
            async for snapshot in call:
                data = json_format.MessageToDict(
                    snapshot, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
                await ws.send(orjson.dumps({"type": "stats", **data}), text=True)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                await ws.close(1008, "unauthenticated")
            elif exc.code() != grpc.StatusCode.CANCELLED:
                await ws.close(1013, "statistics unavailable")
        except ConnectionClosed:
            pass
        finally:
            call.cancel()
