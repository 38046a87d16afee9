"""The one streaming driver of every HTTP provider: `HttpBackend` over a pure adapter.

Theory of operation. `stream()` asks the adapter for an `UpstreamRequest`, sends it on the
deployment's pooled keep-alive client, and then loops: read a body chunk -> the incremental SSE
decoder -> the adapter's per-stream decoder -> typed provider events, yielded as they come.
A non-2xx answer is read (bounded) and handed to the adapter's `classify_error`.

Deadlines (STYLE: connect, first token and gap between tokens, never one cap on the whole
stream). `connect_s` is httpx's connect timeout. `first_token_s` runs from sending the request
to the first token (headers and pre-token events included). `stall_s` bounds each wait for the
next body chunk once tokens flow. The two body deadlines are one lazy timer (`_Deadline`): each
read only stores a timestamp; the timer re-arms itself when it fires early, and it cancels the
task only while the driver itself awaits the upstream, never while the consumer holds the
yielded event (backpressure is not a stall). An expired deadline becomes `UpstreamTimeout`.

End of stream. A body that ends before the adapter saw the provider's own end of stream raises
`StreamCut` (from `decoder.end()`), and so does a connection lost mid-body or a stall, unless the
provider had already signalled the end of the answer (its finish reason and usage: `decoder.end()`
then returns `Finished`), in which case the answer is finished without its end event; every usage event
decoded before that has been yielded already, so the core keeps the partial usage.

Cancellation. Closing the iterator or cancelling the consuming task runs the `finally`, which
closes the response (shielded, so a second cancel cannot interrupt it). On HTTP/1.1 an unread
body cannot go back to the pool, so the connection is closed and the provider sees the
disconnect at once, which is how it stops generating (and billing). After a normal finish the
rest of the body (the chunked terminator) is drained first so the connection is reused.

Transport. Adapters build an `UpstreamRequest` (plain data); `Upstream.open` sends it. The
default, `native`, is our own HTTP/1.1 client (h1.py's sans-I/O parser under h1pool.py's
connection pool): about a third of aiohttp's CPU per request opened, and less per token (see
tests/fakes/bench_driver.py and docs/configuration.md). `transport: aiohttp` uses httpx's API
over aiohttp (`httpx-aiohttp`); `transport: httpx` uses httpx's own transport, with HTTP/2 when
`http2: true` and the `h2` package is installed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import quote, urlsplit

import certifi
import httpx

from server.core.events import Finished, ProviderEvent, ReasoningDelta, TextDelta, ToolCallDelta
from server.core.request import ChatRequest
from server.errors import StreamCut, UpstreamError, UpstreamServerError, UpstreamTimeout
from server.providers.adapter import Adapter, Endpoint, Scrubber, StreamDecoder, UpstreamRequest
from server.providers.base import DeploymentInfo
from server.providers.h1pool import BodyLost, H1Exchange, OriginPool, Unreachable
from server.providers.sse import SSEDecoder
from server.tracing import inject_traceparent

log = logging.getLogger("llmproxy.providers")

ERROR_BODY_LIMIT = 64 * 1024
# After the provider's end-of-stream event, how long to wait for the rest of the body (the
# chunked terminator) so the connection can go back to the pool.
DRAIN_S = 0.5

_TOKENS = (TextDelta, ReasoningDelta, ToolCallDelta)

TransportName = Literal["native", "aiohttp", "httpx"]


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """How the pool talks HTTP. `transport`: "native" (our HTTP/1.1 client, h1pool.py, fastest
    here), "aiohttp" (httpx's API over aiohttp) or "httpx" (httpx's own stack; `http2` needs the
    `h2` package). `ca_file`: a CA bundle to trust instead of the system's (native only)."""

    transport: TransportName = "native"
    http2: bool = False
    max_connections: int = 1000
    keepalive_expiry_s: float = 30.0
    ca_file: str | None = None


class Exchange(Protocol):
    """One upstream response being read, whatever the transport."""

    @property
    def status(self) -> int: ...

    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes:
        """The next body bytes, b"" at the end. Raises `BodyLost`."""
        ...

    async def aclose(self) -> None:
        """Ends the exchange; before the end of the body the connection is closed."""
        ...


class Upstream(Protocol):
    """Sends requests to one origin."""

    async def open(self, request: UpstreamRequest, timeout: httpx.Timeout) -> Exchange:
        """Sends `request`; returns once the response head is in. Raises `Unreachable`."""
        ...

    async def aclose(self) -> None: ...


class _NativeExchange:
    __slots__ = ("_exchange", "read")

    def __init__(self, exchange: H1Exchange) -> None:
        self._exchange = exchange
        self.read = exchange.read

    @property
    def status(self) -> int:
        return self._exchange.status

    def headers(self) -> Mapping[str, str]:
        return httpx.Headers(list(self._exchange.head.headers))

    async def aclose(self) -> None:
        self._exchange.aclose()


class _NativeUpstream:
    def __init__(self, pool: OriginPool) -> None:
        self._pool = pool

    async def open(self, request: UpstreamRequest, timeout: httpx.Timeout) -> Exchange:
        target, host = _target_and_host(request.url)
        headers = [(b"host", host)]
        for name, value in request.headers.items():
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        if "accept-encoding" not in request.headers:
            headers.append((b"accept-encoding", b"identity"))  # SSE is not worth compressing
        headers.append((b"content-length", str(len(request.content)).encode()))
        exchange = await self._pool.open(
            request.method.encode("ascii"),
            target,
            headers,
            request.content,
            connect_s=timeout.connect or 30.0,
            pool_s=timeout.pool or 30.0,
        )
        return _NativeExchange(exchange)

    async def aclose(self) -> None:
        self._pool.aclose()


# What a path and a query may hold unescaped (RFC 3986 3.3, 3.4); the rest is percent-encoded.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"


def _target_and_host(url: str) -> tuple[bytes, bytes]:
    """The request target (path and query) and the Host header of an absolute URL."""
    parts = urlsplit(url)
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    host = parts.netloc.rpartition("@")[2]
    return target.encode("ascii"), host.encode("ascii") if host.isascii() else host.encode("idna")


class _HttpxExchange:
    __slots__ = ("_response", "_chunks")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._chunks = response.aiter_raw().__aiter__()

    @property
    def status(self) -> int:
        return self._response.status_code

    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def read(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return b""
        except httpx.TransportError as exc:
            raise BodyLost(type(exc).__name__) from None

    async def aclose(self) -> None:
        await self._response.aclose()


class _HttpxUpstream:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def open(self, request: UpstreamRequest, timeout: httpx.Timeout) -> Exchange:
        http_request = httpx.Request(request.method, request.url, headers=request.headers, content=request.content)
        http_request.extensions["timeout"] = timeout.as_dict()
        try:
            return _HttpxExchange(await self._client.send(http_request, stream=True))
        except httpx.TransportError as exc:
            cause = exc.__cause__
            # httpx-aiohttp maps several aiohttp connection errors to ConnectTimeout; only a
            # real timeout (or httpx's own) is reported as one.
            timed_out = isinstance(exc, httpx.TimeoutException) and (isinstance(cause, TimeoutError) or not isinstance(cause, OSError))
            raise Unreachable(type(exc).__name__, timed_out=timed_out) from None

    async def aclose(self) -> None:
        await self._client.aclose()


class ClientPool:
    """One keep-alive upstream per origin, shared by its deployments. Built at start-up (no
    module globals); `aclose()` at shutdown closes every one once."""

    def __init__(self, settings: HttpSettings | None = None) -> None:
        self._settings = settings or HttpSettings()
        self._upstreams: dict[str, Upstream] = {}
        self._ssl: ssl.SSLContext | None = None

    @property
    def settings(self) -> HttpSettings:
        return self._settings

    def upstream_for(self, base_url: str) -> Upstream:
        url = httpx.URL(base_url)
        origin = f"{url.scheme}://{url.host}:{url.port or ''}"
        upstream = self._upstreams.get(origin)
        if upstream is None:
            upstream = self._upstreams[origin] = self._new_upstream(url)
        return upstream

    def _new_upstream(self, url: httpx.URL) -> Upstream:
        s = self._settings
        if s.transport == "native":
            if url.scheme not in ("http", "https"):
                raise ValueError(f"unsupported URL scheme {url.scheme!r}")
            port = url.port or (443 if url.scheme == "https" else 80)
            if self._ssl is None and url.scheme == "https":
                self._ssl = ssl.create_default_context(cafile=s.ca_file or certifi.where())
                self._ssl.set_alpn_protocols(["http/1.1"])
            return _NativeUpstream(OriginPool(url.scheme, url.host, port, self._ssl, s.max_connections, s.keepalive_expiry_s))
        limits = httpx.Limits(
            max_connections=s.max_connections,
            max_keepalive_connections=s.max_connections,
            keepalive_expiry=s.keepalive_expiry_s,
        )
        transport: httpx.AsyncBaseTransport
        if s.transport == "aiohttp":
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits, trust_env=False)
        else:
            transport = httpx.AsyncHTTPTransport(limits=limits, http2=s.http2, trust_env=False)
        # trust_env off: the upstream is exactly the configured URL, never an environment proxy.
        return _HttpxUpstream(httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False))

    async def aclose(self) -> None:
        upstreams, self._upstreams = list(self._upstreams.values()), {}
        for upstream in upstreams:
            await upstream.aclose()


class _Deadline:
    """A lazy watchdog over one task's waits for the upstream (see the module docstring)."""

    __slots__ = ("_loop", "_task", "_handle", "_until", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object]) -> None:
        self._loop = loop
        self._task = task
        self._handle: asyncio.TimerHandle | None = None
        self._until: float | None = None
        self.expired = False

    def wait_until(self, when: float) -> None:
        self._until = when
        handle = self._handle
        if handle is None or handle.when() > when:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(when, self._check)

    def wait_for(self, seconds: float) -> None:
        self.wait_until(self._loop.time() + seconds)

    def done_waiting(self) -> None:
        self._until = None

    def _check(self) -> None:
        self._handle = None
        until = self._until
        if until is None:
            return  # not waiting now; the next wait arms the timer again
        if self._loop.time() >= until - 0.001:
            self.expired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(until, self._check)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._until = None


def _signalled_end(decoder: StreamDecoder) -> list[ProviderEvent] | None:
    """The decoder's last events when the provider already signalled the end of the answer
    (finish reason and usage) and only its end event is missing; None when the answer is cut."""
    try:
        return decoder.end()
    except StreamCut:
        return None


class HttpBackend:
    """A `Backend` for one deployment of an HTTP provider."""

    def __init__(self, info: DeploymentInfo, adapter: Adapter, endpoint: Endpoint, pool: ClientPool) -> None:
        self._info = info
        self._adapter = adapter
        self._endpoint = endpoint
        self._pool = pool
        self._upstream = pool.upstream_for(endpoint.base_url or adapter.default_base_url)
        t = endpoint.timeouts
        # The transport's own timeouts cover only connecting and writing the request: the body
        # deadlines are ours. `pool` bounds the wait for a free pooled connection.
        self._timeout = httpx.Timeout(connect=t.connect_s, read=None, write=t.connect_s, pool=t.first_token_s)
        self._scrubber = Scrubber.for_endpoint(endpoint)

    @property
    def info(self) -> DeploymentInfo:
        return self._info

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        """Yields the provider events of one answer, ending with `Finished`.

        Raises `InvalidRequest` (the adapter cannot map the request), the adapter's classified
        `UpstreamError` for a failed response or an in-stream error event, `UpstreamTimeout`,
        `StreamCut` and `MalformedStream`. Cancelling or closing it is safe and closes the
        upstream response at once.
        """
        adapter, timeouts = self._adapter, self._endpoint.timeouts
        upstream_request = adapter.build_request(request, self._endpoint)
        inject_traceparent(upstream_request.headers)  # the attempt's span, when tracing is on
        decoder = adapter.new_decoder()
        sse = SSEDecoder()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        deadline = _Deadline(loop, task)
        first_token_by = loop.time() + timeouts.first_token_s
        exchange: Exchange | None = None
        got_token = False
        try:
            deadline.wait_until(first_token_by)
            try:
                exchange = await self._upstream.open(upstream_request, self._timeout)
            except Unreachable as exc:
                raise self._unreachable(exc) from None
            finally:
                deadline.done_waiting()
            if not 200 <= exchange.status < 300:
                body = await self._read_error_body(exchange, deadline, first_token_by)
                raise adapter.classify_error(exchange.status, exchange.headers(), body)
            read = exchange.read
            stall_s = timeouts.stall_s
            while True:
                if got_token:
                    deadline.wait_for(stall_s)
                else:
                    deadline.wait_until(first_token_by)
                try:
                    chunk = await read()
                except BodyLost:
                    ended = _signalled_end(decoder)
                    if ended is None:
                        raise StreamCut(f"the connection to {adapter.name} was lost mid-stream") from None
                    for event in ended:  # the answer was complete; only its end event was lost
                        yield event
                    return
                finally:
                    deadline.done_waiting()
                if not chunk:
                    break
                for sse_event in sse.decode(chunk):
                    for event in decoder.feed(sse_event):
                        if type(event) is Finished:
                            await self._drain(exchange, deadline)
                            yield event
                            return
                        if not got_token and isinstance(event, _TOKENS):
                            got_token = True
                        yield event
            for sse_event in sse.flush():
                for event in decoder.feed(sse_event):
                    yield event
                    if type(event) is Finished:
                        return
            for event in decoder.end():
                yield event
        except asyncio.CancelledError:
            if deadline.expired and task.uncancel() == 0:
                ended = _signalled_end(decoder) if got_token else None
                if ended is None:
                    raise self._timed_out(got_token) from None
                for event in ended:  # complete, and the end event never came: finished
                    yield event
                return
            raise
        except UpstreamError as exc:
            # Every provider text leaves here without our configured secrets (a provider may
            # echo the request's Authorization header in any error text).
            self._scrubber.with_headers(upstream_request.headers).scrub_error(exc)
            raise
        finally:
            deadline.close()
            if exchange is not None:
                await asyncio.shield(exchange.aclose())

    async def _read_error_body(self, exchange: Exchange, deadline: _Deadline, until: float) -> bytes:
        body = bytearray()
        deadline.wait_until(until)
        try:
            while len(body) < ERROR_BODY_LIMIT and (chunk := await exchange.read()):
                body += chunk
        except BodyLost:
            pass  # classify what we have: the status is what matters
        finally:
            deadline.done_waiting()
        return bytes(body[:ERROR_BODY_LIMIT])

    async def _drain(self, exchange: Exchange, deadline: _Deadline) -> None:
        """Reads what is left of a finished body so the connection returns to the pool; gives
        up quietly after `DRAIN_S` (the response is closed either way)."""
        deadline.wait_for(DRAIN_S)
        try:
            while await exchange.read():
                pass
        except BodyLost:
            pass
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not (deadline.expired and task is not None and task.uncancel() == 0):
                raise
            deadline.expired = False  # our own drain deadline: not an error
        finally:
            deadline.done_waiting()

    def _unreachable(self, exc: Unreachable) -> UpstreamError:
        name = self._adapter.name
        if exc.timed_out:
            return UpstreamTimeout(f"could not connect to {name} in time")
        return UpstreamServerError(f"could not reach {name}")

    def _timed_out(self, got_token: bool) -> UpstreamTimeout:
        t = self._endpoint.timeouts
        if got_token:
            return UpstreamTimeout(f"{self._adapter.name} stalled: no data for {t.stall_s:g}s")
        return UpstreamTimeout(f"{self._adapter.name} sent no token within {t.first_token_s:g}s")
