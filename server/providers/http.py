"""The one streaming driver of every HTTP provider: `HttpBackend` over a pure adapter.

Theory of operation. `stream()` asks the adapter for an `httpx.Request`, sends it on the
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
`StreamCut` (from `decoder.end()`), and so does a connection lost mid-body; every usage event
decoded before that has been yielded already, so the core keeps the partial usage.

Cancellation. Closing the iterator or cancelling the consuming task runs the `finally`, which
closes the response (shielded, so a second cancel cannot interrupt it). On HTTP/1.1 an unread
body cannot go back to the pool, so the connection is closed and the provider sees the
disconnect at once, which is how it stops generating (and billing). After a normal finish the
rest of the body (the chunked terminator) is drained first so the connection is reused.

Transport. httpx's API over aiohttp's transport (`httpx-aiohttp`) by default: reading SSE that
way measured about a third of the CPU per token of httpx's own HTTP/1.1 stack (see
tests/fakes/bench_driver.py and docs/configuration.md). `transport: httpx` selects httpx's own
transport (with HTTP/2 when `http2: true` and the `h2` package is installed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Literal

import httpx

from server.core.events import Finished, ProviderEvent, ReasoningDelta, TextDelta, ToolCallDelta
from server.core.request import ChatRequest
from server.errors import StreamCut, UpstreamError, UpstreamServerError, UpstreamTimeout
from server.providers.adapter import Adapter, Endpoint
from server.providers.base import DeploymentInfo
from server.providers.sse import SSEDecoder

log = logging.getLogger("llmproxy.providers")

ERROR_BODY_LIMIT = 64 * 1024
# After the provider's end-of-stream event, how long to wait for the rest of the body (the
# chunked terminator) so the connection can go back to the pool.
DRAIN_S = 0.5

_TOKENS = (TextDelta, ReasoningDelta, ToolCallDelta)

TransportName = Literal["aiohttp", "httpx"]


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """How the pool talks HTTP. `transport`: "aiohttp" (httpx-aiohttp, fastest here) or
    "httpx" (httpx's own stack; `http2` needs the `h2` package)."""

    transport: TransportName = "aiohttp"
    http2: bool = False
    max_connections: int = 1000
    keepalive_expiry_s: float = 30.0


class ClientPool:
    """One keep-alive `httpx.AsyncClient` per upstream origin, shared by its deployments.
    Built at start-up (no module globals); `aclose()` at shutdown closes every client once."""

    def __init__(self, settings: HttpSettings | None = None) -> None:
        self._settings = settings or HttpSettings()
        self._clients: dict[str, httpx.AsyncClient] = {}

    @property
    def settings(self) -> HttpSettings:
        return self._settings

    def client_for(self, base_url: str) -> httpx.AsyncClient:
        url = httpx.URL(base_url)
        origin = f"{url.scheme}://{url.host}:{url.port or ''}"
        client = self._clients.get(origin)
        if client is None:
            client = self._clients[origin] = self._new_client()
        return client

    def _new_client(self) -> httpx.AsyncClient:
        s = self._settings
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
        return httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


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


class HttpBackend:
    """A `Backend` for one deployment of an HTTP provider."""

    def __init__(self, info: DeploymentInfo, adapter: Adapter, endpoint: Endpoint, pool: ClientPool) -> None:
        self._info = info
        self._adapter = adapter
        self._endpoint = endpoint
        self._pool = pool
        self._client = pool.client_for(endpoint.base_url or adapter.default_base_url)
        t = endpoint.timeouts
        # httpx's own timeouts cover only connecting and writing the request: the body
        # deadlines are ours. `pool` bounds the wait for a free pooled connection.
        self._timeout = httpx.Timeout(connect=t.connect_s, read=None, write=t.connect_s, pool=t.first_token_s)

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
        http_request = adapter.build_request(request, self._endpoint)
        http_request.extensions["timeout"] = self._timeout.as_dict()
        decoder = adapter.new_decoder()
        sse = SSEDecoder()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        deadline = _Deadline(loop, task)
        first_token_by = loop.time() + timeouts.first_token_s
        response: httpx.Response | None = None
        got_token = False
        try:
            deadline.wait_until(first_token_by)
            try:
                response = await self._client.send(http_request, stream=True)
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from None
            finally:
                deadline.done_waiting()
            if not 200 <= response.status_code < 300:
                body = await self._read_error_body(response, deadline, first_token_by)
                raise adapter.classify_error(response.status_code, response.headers, body)
            chunks = response.aiter_raw().__aiter__()
            stall_s = timeouts.stall_s
            while True:
                if got_token:
                    deadline.wait_for(stall_s)
                else:
                    deadline.wait_until(first_token_by)
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except httpx.TransportError:
                    raise StreamCut(f"the connection to {adapter.name} was lost mid-stream") from None
                finally:
                    deadline.done_waiting()
                for sse_event in sse.decode(chunk):
                    for event in decoder.feed(sse_event):
                        if type(event) is Finished:
                            await self._drain(chunks, deadline)
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
                raise self._timed_out(got_token) from None
            raise
        finally:
            deadline.close()
            if response is not None:
                await asyncio.shield(response.aclose())

    async def _read_error_body(self, response: httpx.Response, deadline: _Deadline, until: float) -> bytes:
        body = bytearray()
        deadline.wait_until(until)
        try:
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) >= ERROR_BODY_LIMIT:
                    break
        except httpx.TransportError:
            pass  # classify what we have: the status is what matters
        finally:
            deadline.done_waiting()
        return bytes(body[:ERROR_BODY_LIMIT])

    async def _drain(self, chunks: AsyncIterator[bytes], deadline: _Deadline) -> None:
        """Reads what is left of a finished body so the connection returns to the pool; gives
        up quietly after `DRAIN_S` (the response is closed either way)."""
        deadline.wait_for(DRAIN_S)
        try:
            async for _ in chunks:
                pass
        except httpx.TransportError:
            pass
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not (deadline.expired and task is not None and task.uncancel() == 0):
                raise
            deadline.expired = False  # our own drain deadline: not an error
        finally:
            deadline.done_waiting()

    def _unreachable(self, exc: httpx.TransportError) -> UpstreamError:
        name = self._adapter.name
        cause = exc.__cause__
        # httpx-aiohttp maps several aiohttp connection errors to ConnectTimeout; only a real
        # timeout (or httpx's own) is reported as one.
        is_timeout = isinstance(exc, httpx.TimeoutException) and (
            isinstance(cause, TimeoutError) or not isinstance(cause, OSError)
        )
        if is_timeout:
            return UpstreamTimeout(f"could not connect to {name} in time")
        return UpstreamServerError(f"could not reach {name}")

    def _timed_out(self, got_token: bool) -> UpstreamTimeout:
        t = self._endpoint.timeouts
        if got_token:
            return UpstreamTimeout(f"{self._adapter.name} stalled: no data for {t.stall_s:g}s")
        return UpstreamTimeout(f"{self._adapter.name} sent no token within {t.first_token_s:g}s")
