"""The native HTTP/1.1 transport over real sockets: TLS, stale keep-alive connections, compressed
bodies, flow control, and errors before the head. The provider cases (every provider, every
failure knob) run over it in test_provider_driver.py."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time

import httpx
import pytest

from server.core.events import Finished, TextDelta
from server.core.request import ChatMessage, ChatRequest
from server.errors import StreamCut, UpstreamServerError
from server.providers.adapter import Endpoint, Secret, Timeouts, UpstreamRequest
from server.providers.base import DeploymentInfo
from server.providers.http import ClientPool, HttpBackend, HttpSettings
from server.providers.registry import providers
from tests.fakes.base import FakeServer
from tests.fakes.openai import OpenAIFake
from tests.support.certs import self_signed

FAST = Timeouts(connect_s=2.0, first_token_s=5.0, stall_s=5.0)
TEXT = "I'm unable to provide real-time updates, including current weather information."


def ask() -> ChatRequest:
    return ChatRequest(model="m", messages=(ChatMessage("user", "What is the weather?"),))


def openai_backend(base_url: str, pool: ClientPool, model: str = "m") -> HttpBackend:
    endpoint = Endpoint("openai", model, base_url + "/v1", Secret("sk-test"), timeouts=FAST)
    return HttpBackend(DeploymentInfo("d", "openai", model), providers()["openai"].adapter, endpoint, pool)


async def run(backend: HttpBackend) -> tuple[str, Exception | None, bool]:
    text, finished = "", False
    try:
        async for event in backend.stream(ask()):
            if isinstance(event, TextDelta):
                text += event.text
            finished = finished or isinstance(event, Finished)
    except Exception as exc:
        return text, exc, finished
    return text, None, finished


@pytest.fixture
async def pool():
    p = ClientPool(HttpSettings(transport="native"))
    yield p
    await p.aclose()


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return tuple(map(str, self_signed(tmp_path_factory.mktemp("upstream-tls"), "llmproxy-upstream-test")))


def server_context(cert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    return ctx


async def test_https_upstream_with_a_trusted_ca(cert):
    pool = ClientPool(HttpSettings(ca_file=cert[0]))
    try:
        async with FakeServer(OpenAIFake(), ssl_context=server_context(cert)) as fake:
            b = openai_backend(fake.url, pool)
            for _ in range(2):
                text, error, finished = await run(b)
                assert error is None and finished and text.startswith(TEXT)
        assert fake.connections == 1  # kept alive over TLS too
    finally:
        await pool.aclose()


async def test_https_upstream_with_an_untrusted_certificate_is_refused(cert, pool):
    async with FakeServer(OpenAIFake(), ssl_context=server_context(cert)) as fake:
        text, error, _ = await run(openai_backend(fake.url, pool))
    assert isinstance(error, UpstreamServerError) and "could not reach openai" in str(error) and text == ""
    assert fake.requests == []


# -- raw servers ---------------------------------------------------------------------------------

SSE = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


class RawServer:
    """Answers each request with `answer(n)` (n counts requests); closes after `close_after`."""

    def __init__(self, answer, close_after: int | None = None, idle_close_s: float | None = None) -> None:
        self.answer = answer
        self.close_after = close_after
        self.idle_close_s = idle_close_s
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed = 0  # connections this server has closed
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                if served and self.idle_close_s is not None:
                    await asyncio.sleep(self.idle_close_s)
                    return  # an idle keep-alive timeout, as nginx and cloud balancers have
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), b"0"))
                await reader.readexactly(length)
                self.requests.append(head)
                served += 1
                answer = self.answer(len(self.requests))
                if not answer:
                    return  # close without a word
                writer.write(answer)
                await writer.drain()
                if self.close_after is not None and served >= self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed += 1


async def until(condition, what: str, timeout_s: float = 5.0) -> None:
    """Polls `condition()` until it holds; fails after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.005)


def chunked(body: bytes, headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + headers + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


async def test_a_connection_the_upstream_closed_while_idle_is_replaced(pool):
    async with RawServer(lambda n: chunked(SSE), idle_close_s=0.05) as server:
        b = openai_backend(server.url, pool)
        assert (await run(b))[:2] == ("Hi", None)
        await until(lambda: server.closed == 1, "the upstream closes the idle connection")
        assert (await run(b))[:2] == ("Hi", None)
    assert server.connections == 2 and len(server.requests) == 2


async def test_a_post_on_a_reused_connection_that_broke_after_it_was_read_is_not_sent_again(pool):
    # The upstream read the whole POST and then closed the kept-alive connection without an
    # answer. It may have acted on it: the transport does not send it again (RFC 9112 9.3.1);
    # the attempt fails and the router's retry rules decide (issue 19, finding 5).
    async with RawServer(lambda n: b"" if n == 2 else chunked(SSE)) as server:
        b = openai_backend(server.url, pool)
        assert (await run(b))[:2] == ("Hi", None)
        text, error, _ = await run(b)
        assert isinstance(error, UpstreamServerError) and text == ""
        assert (await run(b))[:2] == ("Hi", None)  # the next request gets a new connection
    assert len(server.requests) == 3


async def test_an_idempotent_request_on_a_reused_connection_that_broke_goes_once_more():
    from server.providers.h1pool import OriginPool

    async with RawServer(lambda n: b"" if n == 2 else chunked(SSE)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        origin = OriginPool("http", "127.0.0.1", port, None, 10, 30.0)
        try:
            for _ in range(2):
                exchange = await origin.open(b"GET", b"/", [(b"host", b"127.0.0.1")], b"", connect_s=5, pool_s=5)
                while await exchange.read():
                    pass
                exchange.aclose()
        finally:
            origin.aclose()
    assert server.connections == 2 and len(server.requests) == 3  # the GET went twice


async def test_a_connection_closed_without_an_answer_is_an_upstream_error(pool):
    async with RawServer(lambda n: b"", close_after=1) as server:
        text, error, _ = await run(openai_backend(server.url, pool))
    assert isinstance(error, UpstreamServerError) and str(error) == "could not reach openai" and text == ""
    assert len(server.requests) == 1  # a fresh connection is not retried: the upstream read it


async def test_a_compressed_body_is_decoded(pool):
    async with RawServer(lambda n: chunked(gzip.compress(SSE), b"Content-Encoding: gzip\r\n")) as server:
        text, error, finished = await run(openai_backend(server.url, pool))
        assert (text, error, finished) == ("Hi", None, True)
        assert b"accept-encoding: identity" in server.requests[0].lower()


async def test_a_body_that_breaks_framing_is_a_cut_stream(pool):
    first = SSE.split(b"\n\n")[0] + b"\n\n"
    broken = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(first) + first + b"\r\nzz\r\n"
    async with RawServer(lambda n: broken) as server:
        text, error, finished = await run(openai_backend(server.url, pool))
    assert isinstance(error, StreamCut) and text == "Hi" and not finished


async def test_an_unread_body_stops_reading_the_socket(pool):
    # 4 MiB of events the consumer does not read: the client must stop reading the socket
    # (pause_reading), so the upstream's writes block instead of filling our memory.
    event = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'
    many = event * (4 * 1024 * 1024 // len(event))
    async with RawServer(lambda n: chunked(many + SSE)) as server:
        upstream = pool.upstream_for(server.url)
        request = UpstreamRequest("POST", server.url + "/v1/chat/completions", {}, b"{}")
        exchange = await upstream.open(request, httpx.Timeout(2.0))
        conn = exchange._exchange._conn  # the one connection under test
        await until(lambda: conn._paused, "the client pauses reading the socket")
        assert conn.reader.buffered < 2 * 1024 * 1024
        total = 0
        while chunk := await exchange.read():
            total += len(chunk)
        assert total == len(many) + len(SSE)
