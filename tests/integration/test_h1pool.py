"""The native HTTP/1.1 transport over real sockets: TLS, stale keep-alive connections, compressed
bodies, flow control, and errors before the head. The provider cases (every provider, every
failure knob) run over it in test_provider_driver.py."""

from __future__ import annotations

import asyncio
import gzip
import select
import socket
import ssl
import time
import zlib

import httpx
import pytest

from server.core.events import Finished, TextDelta
from server.core.request import ChatMessage, ChatRequest
from server.errors import StreamCut, UpstreamServerError
from server.providers.adapter import Endpoint, Secret, Timeouts, UpstreamRequest
from server.providers.base import DeploymentInfo
from server.providers.h1pool import BodyLost, OriginPool
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
    assert isinstance(error, UpstreamServerError) and text == ""
    # the reason stays in the typed error (and the log): which check failed, no address
    assert str(error) == "could not reach openai: TLS certificate verification failed: self-signed certificate"
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
        self.writers: list[asyncio.StreamWriter] = []
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
        self.writers.append(writer)
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


async def test_a_post_is_never_sent_twice_once_written(pool, caplog):
    # The race the idle check cannot see: the upstream closes the kept-alive connection just as
    # the next request arrives, after reading it. It may have started generating: the request
    # is not sent again (a second generation is a second bill); the caller gets a typed error.
    async with RawServer(lambda n: b"" if n == 2 else chunked(SSE)) as server:
        b = openai_backend(server.url, pool)
        assert (await run(b))[:2] == ("Hi", None)
        text, error, _ = await run(b)
        assert isinstance(error, UpstreamServerError) and text == ""
        assert str(error) == "could not reach openai: the reused connection closed before the response"
        assert len(server.requests) == 2  # the second request arrived once, and only once
        assert (await run(b))[:2] == ("Hi", None)  # the next one goes on a new connection
    assert server.connections == 2 and len(server.requests) == 3
    assert any("could not reach openai: the reused connection closed" in r.getMessage() for r in caplog.records)


async def test_an_idle_connection_found_closed_before_writing_is_not_used(pool):
    # The upstream closed the idle connection, and the event loop has not run since: the
    # transport still looks open, but the socket reads EOF. It is dropped before anything is
    # written, and the request goes on a new connection, once.
    async with RawServer(lambda n: chunked(SSE)) as server:
        b = openai_backend(server.url, pool)
        assert (await run(b))[:2] == ("Hi", None)
        origin = pool.upstream_for(server.url)._pool
        [idle] = origin._idle
        # the upstream closes it (the FIN leaves now; the event loop does not run until our next await)
        server.writers[0].transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        poller = select.poll()
        poller.register(idle.transport.get_extra_info("socket").fileno(), select.POLLIN)
        assert poller.poll(5000)  # the kernel has it (a blocking wait outside the loop)
        assert idle.usable  # what the pool saw before: it would have written on it
        assert origin._idle_connection() is None and not origin._idle
        assert (await run(b))[:2] == ("Hi", None)
    assert server.connections == 2 and len(server.requests) == 2


async def test_a_connection_closed_without_an_answer_is_an_upstream_error(pool):
    async with RawServer(lambda n: b"", close_after=1) as server:
        text, error, _ = await run(openai_backend(server.url, pool))
    assert isinstance(error, UpstreamServerError) and text == ""
    assert str(error) == "could not reach openai: the connection closed before the response"
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


# -- codings, caps, refused heads ------------------------------------------------------------------


def framed(body: bytes, headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + headers + b"\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


async def test_gzip_under_chunked_is_decoded(pool):
    async with RawServer(lambda n: framed(gzip.compress(SSE), b"Transfer-Encoding: gzip, chunked\r\n")) as server:
        assert await run(openai_backend(server.url, pool)) == ("Hi", None, True)


async def test_a_transfer_coding_over_a_content_coding_is_undone_in_order(pool):
    body = gzip.compress(zlib.compress(SSE))  # content coding deflate first, then transfer coding gzip
    async with RawServer(lambda n: framed(body, b"Content-Encoding: deflate\r\nTransfer-Encoding: gzip, chunked\r\n")) as server:
        assert await run(openai_backend(server.url, pool)) == ("Hi", None, True)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (b"Transfer-Encoding: chunked\r\nContent-Length: 10\r\n", "both Transfer-Encoding and Content-Length"),
        (b"Transfer-Encoding: br, chunked\r\n", "an unsupported transfer coding: 'br'"),
        (b"Transfer-Encoding: chunked\r\nX Bad Name: 1\r\n", "a malformed header line"),
    ],
)
async def test_a_head_we_refuse_is_a_typed_error_that_says_why(pool, headers, reason):
    async with RawServer(lambda n: framed(SSE, headers)) as server:
        text, error, finished = await run(openai_backend(server.url, pool))
    assert isinstance(error, UpstreamServerError) and text == "" and not finished
    assert str(error).startswith("could not reach openai: the response broke HTTP/1.1: ") and reason in str(error)


async def test_a_compressed_body_that_expands_past_the_cap_is_refused():
    bomb = gzip.compress(b"data: " + b"0" * 5_000_000 + b"\n\n")  # 5 MB from about 5 KB
    async with RawServer(lambda n: framed(bomb, b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n")) as server:
        port = int(server.url.rsplit(":", 1)[1])
        origin = OriginPool("http", "127.0.0.1", port, None, 10, 30.0, max_decoded_bytes=1_000_000)
        headers = [(b"host", b"127.0.0.1"), (b"content-length", b"2")]
        exchange = await origin.open(b"POST", b"/v1/chat/completions", headers, b"{}", connect_s=2.0, pool_s=2.0)
        total = 0
        with pytest.raises(BodyLost, match="expands past the size cap"):
            while chunk := await exchange.read():
                total += len(chunk)
        assert total <= 1_000_000 and not origin._idle  # the connection is not reused
        origin.aclose()


async def test_a_corrupt_compressed_body_is_a_cut_stream(pool):
    async with RawServer(lambda n: framed(b"\x1f\x8b\x08\x00garbage-not-gzip", b"Transfer-Encoding: gzip, chunked\r\n")) as server:
        text, error, finished = await run(openai_backend(server.url, pool))
    assert isinstance(error, StreamCut) and text == "" and not finished
