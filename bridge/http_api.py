"""The bridge's HTTP APIs: OpenAI- and Anthropic-compatible endpoints over the same relay.

Theory of operation. Every HTTP request that generates is a connection of its own on the
bridge's one `Relay` call (bridge/relay.py): an `HttpLink` opened with the client's key, one
`start` frame, and the server frames of that one stream translated into the provider's shape by
a sans-I/O translator (bridge/openai_chat.py, bridge/anthropic_messages.py). The server does
what it does for a WebSocket (keys, limits, routing, analytics); the bridge only translates.
When the request ends, for whatever reason, the connection is closed with `end_session`, so a
client that goes away cancels the stream and the server closes the upstream request (aiohttp
cancels the handler when its client disconnects: `handler_cancellation=True`).

Status codes. A stream response's status is decided by the first frame that says something:
an `error` before any output is answered with its own status (401, 403, 404, 429 with
`retry-after`, 5xx); once a token, tool call, reasoning, heartbeat or `done` arrived the 200
headers go out and a later error is an in-stream error event. (The server sends `started` with
the provider's first event, so a heartbeat is all a slow first token shows; a request that waits
longer than the heartbeat interval for a deployment cooling down after a 429 therefore gets its
429 as an in-stream error, which the SDKs raise as `APIError`.) Server heartbeats (a slow first
token) are SSE comments, which every SSE client ignores. Responses carry
`X-Accel-Buffering: no` and every batch of frames is one write, flushed at once.

The same server carries our own protocol over SSE (bridge/sse_transport.py), for networks where
WebSockets fail. `websockets` reads no request bodies, so these endpoints are served by aiohttp on a port of
their own (`--http-port`); the WebSocket path is untouched.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import orjson
from aiohttp import web

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from bridge.headers import one_header
from bridge import anthropic_messages as anth
from bridge import openai_chat as oai
from bridge import openai_responses as resp
from bridge.openai_chat import ApiError
from bridge.pool import RelayPool
from bridge.sse_transport import SseTransport

log = logging.getLogger("llmproxy.bridge.http")

_CREDENTIAL_RE = re.compile(r"[A-Za-z0-9._~+/=-]{1,256}")
_CONTENT_KINDS = frozenset({"token", "tool_call", "reasoning", "heartbeat", "done", "failover", "restarted"})
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx would otherwise buffer the stream
}
_GRPC_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.UNAUTHENTICATED: pb.ERROR_CODE_UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: pb.ERROR_CODE_FORBIDDEN_MODEL,
    grpc.StatusCode.RESOURCE_EXHAUSTED: pb.ERROR_CODE_RATE_LIMITED,
    grpc.StatusCode.UNAVAILABLE: pb.ERROR_CODE_UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8766
    max_body_bytes: int = 1 << 20
    max_messages: int = 1024
    reattach_timeout_s: float = 10.0  # how long a request waits for the server's first frame
    max_pending_bytes: int = 1 << 20  # unsent output one request may hold before it is cut
    reuse_port: bool = False  # SO_REUSEPORT, as the WebSocket port (BridgeConfig.reuse_port)


class SlowClient(Exception):
    """A streaming client stopped reading: what waits for it passed `max_pending_bytes`."""


class HttpLink:
    """One HTTP request carried by the relay: the `Link` of bridge/relay.py. Frames wait here
    until the handler takes them (one batch per relay batch)."""

    __slots__ = ("opening", "end", "pending_bytes", "_pending", "_wake")

    def __init__(self, opening: pb.RelayOpen) -> None:
        self.opening = opening
        self.end: tuple[int, str] | None = None  # the connection ended: (ErrorCode, message)
        self.pending_bytes = 0
        self._pending: list[pb.ServerFrame] = []
        self._wake = asyncio.Event()

    def deliver(self, frame: pb.ServerFrame) -> None:
        self._pending.append(frame)
        self.pending_bytes += len(frame.token.text) + 16 if frame.HasField("token") else 512

    def flush(self) -> None:
        self._wake.set()

    def ended(self, code: int, message: str) -> None:
        self.end = (code, message)
        self._wake.set()

    def relay_lost(self) -> None:
        # A request is short-lived: it fails rather than re-attaching (the client's SDK retries).
        if self.end is None:
            self.end = (pb.ERROR_CODE_UNAVAILABLE, "the connection to the llmproxy server was lost")
        self._wake.set()

    def reopen(self) -> pb.RelayOpen:
        return self.opening

    async def next_batch(self, timeout_s: float | None) -> list[pb.ServerFrame]:
        """What arrived since the last call (waits for something). Raises TimeoutError."""
        if not self._pending and self.end is None:
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        self._wake.clear()
        batch, self._pending = self._pending, []
        self.pending_bytes = 0
        return batch


class Translator(Protocol):
    """One generation in a provider's shape (bridge/openai_chat.py, bridge/anthropic_messages.py)."""

    finished: dict[str, Any] | None

    def stream_frame(self, frame: pb.ServerFrame) -> bytes: ...

    def collect_frame(self, frame: pb.ServerFrame) -> None: ...

    def stream_error(self, error: ApiError) -> bytes:
        """The in-stream error event (after the 200 headers)."""


@dataclass(frozen=True, slots=True)
class Shape:
    """How one API spells an error answered with its own status."""

    error_body: Callable[[ApiError], dict[str, Any]]


OPENAI = Shape(oai.error_body)
ANTHROPIC = Shape(anth.error_body)


def credential_of(request: web.Request) -> str:
    """The client's key: `Authorization: Bearer <key>` or `x-api-key` (Anthropic's header);
    "" when none. Raises `ApiError` 401 when malformed, or two different keys are given."""
    found: set[str] = set()
    for value in request.headers.getall("Authorization", []):
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            raise ApiError(401, "invalid_request_error", "invalid_api_key", "the Authorization header must be `Bearer <key>`")
        found.add(token.strip())
    for value in request.headers.getall("x-api-key", []):
        found.add(value.strip())
    if not found:
        return ""
    if len(found) > 1 or not _CREDENTIAL_RE.fullmatch(next(iter(found))):
        raise ApiError(401, "invalid_request_error", "invalid_api_key", "one well-formed API key is expected")
    return found.pop()


# The response cache on the HTTP APIs (docs/caching.md): RFC 9111's request directives
# `Cache-Control: no-cache` (do not answer from the cache) and `no-store` (do not store this
# answer), and `X-LLMProxy-Cache-TTL: seconds`. A replayed answer's response says
# `X-LLMProxy-Cache: exact` (or `semantic; score=0.93`).
CACHE_TTL_HEADER = "X-LLMProxy-Cache-TTL"
CACHE_HIT_HEADER = "X-LLMProxy-Cache"


def cache_control_of(request: web.Request) -> pb.CacheControl | None:
    """The request's cache controls, or None when it sets none. Raises `ApiError` 400 for a
    malformed TTL."""
    directives = {d.strip().split("=", 1)[0].lower() for v in request.headers.getall("Cache-Control", []) for d in v.split(",")}
    ttl = request.headers.get(CACHE_TTL_HEADER)
    if not ({"no-cache", "no-store"} & directives) and ttl is None:
        return None
    control = pb.CacheControl(skip_read="no-cache" in directives, skip_write="no-store" in directives)
    if ttl is not None:
        if not ttl.strip().isdigit() or int(ttl) >= 2**32:
            raise ApiError(400, "invalid_request_error", "invalid_value", f"{CACHE_TTL_HEADER} must be a whole number of seconds")
        control.ttl_s = int(ttl)
    return control


def cache_hit_headers(started: pb.StreamStarted | None) -> dict[str, str]:
    if started is None or not started.HasField("cache"):
        return {}
    hit = started.cache
    return {CACHE_HIT_HEADER: hit.kind if hit.kind == "exact" else f"{hit.kind}; score={hit.score:.4f}"}


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "llmproxy"  # as the WebSocket port says; no library versions


def json_response(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers)


class HttpApi:
    def __init__(
        self, config: HttpConfig, relay: RelayPool, origin_allowed: Callable[[str], bool] = lambda origin: False
    ) -> None:
        self._config = config
        self._relay = relay
        self.sse = SseTransport(
            relay, origin_allowed, credential_of, config.max_body_bytes, config.max_messages, config.max_pending_bytes, config.reattach_timeout_s
        )
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_body_bytes)
        app.on_response_prepare.append(_server_header)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)
        self.sse.routes(app)
        return app

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._config.host, self._config.port, ssl_context=tls, reuse_port=self._config.reuse_port or None)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- endpoints --------------------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        async def begin(body: object) -> tuple[pb.ClientFrame, bool, Translator]:
            req = oai.parse_chat_request(body, self._config.max_body_bytes, self._config.max_messages)
            return req.start, req.stream, oai.ChatEncoder(req.model, req.include_usage)

        return await self._generate(request, OPENAI, "openai.chat_completions", begin)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        async def begin(body: object) -> tuple[pb.ClientFrame, bool, Translator]:
            req = resp.parse_responses_request(body, self._config.max_body_bytes, self._config.max_messages)
            return req.start, req.stream, resp.ResponsesEncoder(req.model)

        return await self._generate(request, OPENAI, "openai.responses", begin)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        async def begin(body: object) -> tuple[pb.ClientFrame, bool, Translator]:
            req = anth.parse_messages_request(body, self._config.max_body_bytes, self._config.max_messages)
            return req.start, req.stream, anth.MessagesEncoder(req.model)

        return await self._generate(request, ANTHROPIC, "anthropic.messages", begin)

    async def _models(self, request: web.Request) -> web.Response:
        try:
            response = await self._list_models(request)
        except ApiError as exc:
            return self._error(OPENAI, exc)
        return json_response(oai.models_list(response))

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            response = await self._list_models(request)
        except ApiError as exc:
            return self._error(OPENAI, exc)
        if not any(m.name == name for m in response.models):
            return self._error(OPENAI, ApiError(404, "invalid_request_error", "model_not_found", f"The model '{name}' does not exist", "model"))
        return json_response(oai.model_entry(name))

    async def _list_models(self, request: web.Request) -> pb.ListModelsResponse:
        key = credential_of(request)
        metadata = (("authorization", f"Bearer {key}"),) if key else None
        try:
            response: pb.ListModelsResponse = await pb_grpc.LLMProxyStub(self._relay.channel()).ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            code = _GRPC_CODES.get(exc.code(), pb.ERROR_CODE_UNAVAILABLE)
            raise oai.api_error(code, exc.details() or "the llmproxy server refused") from None
        return response

    # -- the driver --------------------------------------------------------------------------------

    def _error(self, shape: Shape, error: ApiError) -> web.Response:
        return json_response(shape.error_body(error), error.status, oai.retry_headers(error))

    async def _generate(
        self,
        request: web.Request,
        shape: Shape,
        api: str,
        begin: Callable[[object], Awaitable[tuple[pb.ClientFrame, bool, Translator]]],
    ) -> web.StreamResponse:
        try:
            credential = credential_of(request)
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError as exc:
                raise oai.invalid(f"the body is not valid JSON: {exc.msg}") from None
            start, stream, translator = await begin(body)
            control = cache_control_of(request)
            if control is not None:
                start.start.cache.CopyFrom(control)
        except ApiError as exc:
            return self._error(shape, exc)
        except web.HTTPRequestEntityTooLarge:
            return self._error(shape, ApiError(413, "invalid_request_error", "request_too_large", "the request body is too large"))
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        opening = pb.RelayOpen(
            credential=credential,
            origin=request.headers.get("Origin", ""),
            peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "",
            traceparent=one_header(request.headers.getall("traceparent", [])),
            api=api,
        )
        link = HttpLink(opening)
        conn = self._relay.open(link, opening)
        try:
            self._relay.send(conn, start)
            if stream:
                return await self._stream(request, link, shape, translator)
            return await self._collect(link, shape, translator)
        finally:
            # Whatever happened (the answer ended, the client went away: CancelledError), the
            # session ends with it: its stream is cancelled and the upstream request closed.
            self._relay.close(conn, end_session=True)

    async def _batches(self, link: HttpLink) -> Any:
        """Batches of frames until the connection ends; `ApiError` when it fails."""
        timeout: float | None = self._config.reattach_timeout_s  # until the server answers
        while True:
            if link.pending_bytes > self._config.max_pending_bytes:  # gathered while a write was blocked
                raise SlowClient()
            try:
                frames = await link.next_batch(timeout)
            except TimeoutError:
                raise oai.api_error(pb.ERROR_CODE_UNAVAILABLE, "the llmproxy server is unavailable") from None
            if frames:
                timeout = None
                yield frames
            elif link.end is not None:
                raise oai.api_error(*link.end)

    async def _collect(self, link: HttpLink, shape: Shape, translator: Translator) -> web.Response:
        started: pb.StreamStarted | None = None
        try:
            async for frames in self._batches(link):
                for frame in frames:
                    if frame.HasField("error"):
                        e = frame.error
                        return self._error(shape, oai.api_error(e.code, e.message, e.retry_after_ms))
                    if frame.HasField("started"):
                        started = frame.started
                    translator.collect_frame(frame)
                if translator.finished is not None:
                    return json_response(translator.finished, headers=cache_hit_headers(started))
        except ApiError as exc:
            return self._error(shape, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _stream(self, request: web.Request, link: HttpLink, shape: Shape, translator: Translator) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        started: pb.StreamStarted | None = None
        held: list[bytes] = []  # output before the headers are decided (the `started` chunk)
        try:
            async for frames in self._batches(link):
                out = held
                for frame in frames:
                    kind = frame.WhichOneof("kind")
                    if kind == "error":
                        e = frame.error
                        error = oai.api_error(e.code, e.message, e.retry_after_ms)
                        if response is None:
                            return self._error(shape, error)
                        out.append(translator.stream_error(error))
                        await response.write(b"".join(out))
                        return response
                    if kind == "started":
                        started = frame.started
                    if response is None and kind in _CONTENT_KINDS:
                        response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **cache_hit_headers(started)})
                        await response.prepare(request)
                    data = translator.stream_frame(frame)
                    if data:
                        out.append(data)
                if response is not None and out:
                    await response.write(b"".join(out))
                    out.clear()
                if translator.finished is not None and response is not None:
                    return response
        except ApiError as exc:
            if response is None:
                return self._error(shape, exc)
            await response.write(translator.stream_error(exc))
        except SlowClient:
            # It is not reading: no error event could reach it. Cut the connection (the request
            # ends, and with it the stream and the upstream request).
            log.warning("cutting an HTTP stream whose client stopped reading (over %d bytes unsent)", self._config.max_pending_bytes)
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionResetError, ConnectionError):
            log.debug("an HTTP client went away mid-stream")
        assert response is not None
        return response
