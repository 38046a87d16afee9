"""The WebSocket bridge: one WebSocket <-> one gRPC `Stream` call, and nothing more.

Per connection: the reader decodes each text frame with the codec and writes the proto to the
call (a bad frame is answered with an error frame and the connection goes on); the downstream
task reads the call and sends each server frame as one JSON text frame. When either side ends,
the other is closed. A WebSocket the client closed with 1000 (normal closure: the app is done)
ends the session (a `close` frame, then half-close: every stream is cancelled). Any other end
(a drop, 1001 on a page reload) only cancels the call: the server keeps the session's streams
generating for the resume grace period, and the client resumes through any bridge.

A client that stops reading is cut off: websockets' keepalive cannot notice it while data is
flowing (its ping waits behind the full send buffer), so a watchdog aborts any connection whose
send has been blocked longer than the ping timeout. Its session stays resumable.

`/stats` is a second WebSocket endpoint: one `WatchStats` subscription per connection, each
snapshot sent as one JSON frame (the dashboard's feed; no keys, no prompt text).

Plain HTTP on the same port: `/healthz`, the demo chat page at `/`, its static files, and the
JavaScript client under `/js/`. Every other path gets the same 404.
"""

from __future__ import annotations

import asyncio
import http
import logging
import mimetypes
import socket
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import orjson
from google.protobuf import json_format
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHeader
from websockets.headers import parse_subprotocol
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from bridge.codec import FrameError, decode_client_frame, encode_error, encode_server_frame
from server.errors import Code

log = logging.getLogger("llmproxy.bridge")

# gRPC status of a failed call -> (error code for the client, WebSocket close code, RFC 6455 7.4.1)
STATUS_TO_CLOSE: dict[grpc.StatusCode, tuple[Code, int]] = {
    grpc.StatusCode.UNAVAILABLE: (Code.UNAVAILABLE, 1013),  # try again later
    grpc.StatusCode.DEADLINE_EXCEEDED: (Code.TIMEOUT, 1013),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (Code.RATE_LIMITED, 1013),
    grpc.StatusCode.UNAUTHENTICATED: (Code.UNAUTHENTICATED, 1008),  # policy violation
    grpc.StatusCode.PERMISSION_DENIED: (Code.UNAUTHENTICATED, 1008),
    grpc.StatusCode.INVALID_ARGUMENT: (Code.INVALID_REQUEST, 1008),
}
DEFAULT_CLOSE = (Code.INTERNAL, 1011)


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
    static_dirs: dict[str, Path] = field(default_factory=dict)  # URL prefix -> directory
    open_timeout_s: float = 10.0  # the opening handshake must complete within this
    max_messages: int = 1024  # messages per start/modify frame (the server checks again)
    tls_cert: str = ""  # PEM chain and key: serve wss:// and https://
    tls_key: str = ""
    grpc_ca: str = ""  # PEM CA bundle: talk gRPC over TLS to the server, trusting these roots


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


class Bridge:
    def __init__(self, config: BridgeConfig, channel: grpc.aio.Channel) -> None:
        self._config = config
        self._stub = pb_grpc.LLMProxyStub(channel)
        self._static = StaticFiles(config.static_dirs)
        self._origins: frozenset[str] = frozenset(config.allowed_origins)
        self._sending: dict[ServerConnection, float] = {}  # connection -> when its blocked send began

    async def watchdog(self) -> None:
        """Aborts connections whose send has been blocked longer than the ping timeout."""
        limit = self._config.ping_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for ws, since in list(self._sending.items()):
                if since and now - since > limit:
                    log.warning("closing a connection that stopped reading")
                    self._sending.pop(ws, None)
                    ws.transport.abort()

    def allow_own_origin(self, port: int) -> None:
        """Called once the port is known: pages served by this bridge may connect."""
        own = {f"http://{h}:{port}" for h in {self._config.host, "127.0.0.1", "localhost"}}
        self._origins = self._origins | own

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
        )
        port = next(iter(server.sockets)).getsockname()[1]
        self.allow_own_origin(port)
        return server

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        text = "text/plain; charset=utf-8"
        if path in ("/stream", "/stats"):
            origins = request.headers.get_all("Origin")
            # Two Origin headers are no single origin (RFC 6454 7.3): refused like a foreign one.
            if len(origins) > 1 or (origins and origins[0] not in self._origins):
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
        elif path == "/healthz":
            response = _response(http.HTTPStatus.OK, b"ok\n", text)
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
            await ws.send(encode_error(Code.UNAUTHENTICATED, str(exc)), text=True)
            await ws.close(1008, "unauthenticated")
            return
        # The identity goes to the server as call metadata, and nowhere else (no log, no frame).
        metadata = (("authorization", f"Bearer {key}"),) if key is not None else None
        if ws.request.path.split("?", 1)[0] == "/stats":
            await self._stats(ws, metadata)
            return
        call = self._stub.Stream(metadata=metadata)
        downstream = asyncio.create_task(self._downstream(call, ws))
        max_bytes, max_messages = self._config.max_frame_bytes, self._config.max_messages
        try:
            async for message in ws:
                try:
                    frame = decode_client_frame(message, max_bytes, max_messages)
                except FrameError as exc:
                    await ws.send(encode_error(exc.code, exc.message, exc.stream_id), text=True)
                    continue
                try:
                    await call.write(frame)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    break  # the call has ended; downstream reports why
        except ConnectionClosed:
            pass
        finally:
            close = ws.protocol.close_rcvd
            if close is not None and close.code == 1000 and not call.done():
                await self._end_session(call, downstream)
            call.cancel()
            downstream.cancel()
            await asyncio.gather(downstream, return_exceptions=True)

    async def _stats(self, ws: ServerConnection, metadata: tuple[tuple[str, str], ...] | None) -> None:
        """Relays live snapshots until either side goes away."""
        call = self._stub.WatchStats(pb.WatchStatsRequest(interval_ms=1000), metadata=metadata)
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

    @staticmethod
    async def _end_session(call: grpc.aio.StreamStreamCall, downstream: asyncio.Task[None]) -> None:
        """The client is done: end its session so nothing keeps generating for it. The server
        ends the call once the cancellations are through; wait for that, briefly."""
        try:
            await call.write(pb.ClientFrame(close=pb.Close()))
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return
        await asyncio.wait({downstream}, timeout=1.0)

    async def _downstream(self, call: grpc.aio.StreamStreamCall, ws: ServerConnection) -> None:
        send, sending, clock = ws.send, self._sending, time.monotonic
        sending[ws] = 0.0
        try:
            async for frame in call:
                sending[ws] = clock()
                await send(encode_server_frame(frame), text=True)
                sending[ws] = 0.0
        except grpc.aio.AioRpcError as exc:
            code, close_code = STATUS_TO_CLOSE.get(exc.code(), DEFAULT_CLOSE)
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.warning("gRPC call ended: %s", exc.code().name)
                message = "the llmproxy server is unavailable" if code is Code.UNAVAILABLE else "the call to the llmproxy server failed"
                if code is Code.UNAUTHENTICATED:
                    message = UNAUTHENTICATED_MESSAGE  # word for word what a malformed key gets
                try:
                    await send(encode_error(code, message), text=True)
                    await ws.close(close_code, message)
                except ConnectionClosed:
                    pass
        except ConnectionClosed:
            pass
        finally:
            sending.pop(ws, None)
