"""Each upstream transport over real sockets, beyond the provider cases of test_provider_driver.py:
the aiohttp transport is aiohttp's own API (no httpx in between) and trusts `ca_file`; every
transport honours the egress proxy of the environment (a tiny forward proxy on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys

import pytest

from server.core.events import Finished, TextDelta
from server.core.request import ChatMessage, ChatRequest
from server.providers.adapter import Endpoint, Secret, Timeouts
from server.providers.base import DeploymentInfo
from server.errors import EventTooLarge, UpstreamServerError
from server.providers.egress import EgressProxies
from server.providers.http import ClientPool, HttpBackend, HttpSettings
from server.providers.registry import providers
from tests.fakes.base import FakeServer
from tests.fakes.openai import OpenAIFake
from tests.support.certs import self_signed
from tests.support.forward_proxy import ForwardProxy
from tests.support.procs import ROOT

FAST = Timeouts(connect_s=2.0, first_token_s=5.0, stall_s=5.0)
TEXT = "I'm unable to provide real-time updates, including current weather information."


def openai_backend(base_url: str, pool: ClientPool) -> HttpBackend:
    endpoint = Endpoint("openai", "m", base_url + "/v1", Secret("sk-test"), timeouts=FAST)
    return HttpBackend(DeploymentInfo("d", "openai", "m"), providers()["openai"].adapter, endpoint, pool)


async def collect(backend: HttpBackend) -> tuple[str, bool]:
    text, finished = "", False
    request = ChatRequest(model="m", messages=(ChatMessage("user", "What is the weather?"),))
    async for event in backend.stream(request):
        if isinstance(event, TextDelta):
            text += event.text
        finished = finished or isinstance(event, Finished)
    return text, finished


def test_the_aiohttp_transport_is_aiohttps_own_api():
    # In a fresh interpreter: streaming over `transport: aiohttp` loads aiohttp's client and no
    # httpx bridge to it (httpx-aiohttp's AiohttpTransport was the old one).
    code = (
        "import asyncio, sys\n"
        "from tests.integration.test_transports import collect, openai_backend\n"
        "from tests.fakes.base import FakeServer\n"
        "from tests.fakes.openai import OpenAIFake\n"
        "from server.providers.http import ClientPool, HttpSettings\n"
        "async def main():\n"
        "    pool = ClientPool(HttpSettings(transport='aiohttp'))\n"
        "    async with FakeServer(OpenAIFake()) as fake:\n"
        "        text, finished = await collect(openai_backend(fake.url, pool))\n"
        "    await pool.aclose()\n"
        "    print(finished, 'httpx_aiohttp' in sys.modules, 'aiohttp.client' in sys.modules)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "True"]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return tuple(map(str, self_signed(tmp_path_factory.mktemp("aiohttp-tls"), "llmproxy-upstream-test")))


async def test_the_aiohttp_transport_trusts_ca_file(cert):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*cert)
    pool = ClientPool(HttpSettings(transport="aiohttp", ca_file=cert[0]))
    try:
        async with FakeServer(OpenAIFake(), ssl_context=server_ctx) as fake:
            text, finished = await collect(openai_backend(fake.url, pool))
        assert finished and text.startswith(TEXT)
        assert fake.last_request.headers["accept-encoding"] == "identity"  # as native: SSE uncompressed
    finally:
        await pool.aclose()


# -- egress proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) ------------------------------------------------


@pytest.fixture(scope="module")
def upstream_cert(tmp_path_factory):
    return tuple(map(str, self_signed(tmp_path_factory.mktemp("egress-tls"), "upstream.test", ("upstream.test",))))


def pool_with(transport: str, env: dict[str, str], ca_file: str | None = None) -> ClientPool:
    return ClientPool(HttpSettings(transport=transport, ca_file=ca_file, proxies=EgressProxies.from_env(env)))  # type: ignore[arg-type]


def fake_port(fake: FakeServer) -> int:
    return int(fake.url.rsplit(":", 1)[1])


@pytest.mark.parametrize("transport", ["native", "aiohttp"])
async def test_https_goes_through_a_connect_tunnel_of_the_egress_proxy(transport, upstream_cert):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*upstream_cert)
    async with FakeServer(OpenAIFake(), ssl_context=server_ctx) as fake:
        async with ForwardProxy({"upstream.test:443": ("127.0.0.1", fake_port(fake))}, auth=BASIC) as proxy:
            env = {"HTTPS_PROXY": proxy.url.replace("http://", "http://bob:s3cret@")}
            pool = pool_with(transport, env, ca_file=upstream_cert[0])
            try:
                b = openai_backend("https://upstream.test", pool)
                for _ in range(2):  # "upstream.test" resolves only inside the proxy
                    text, finished = await collect(b)
                    assert finished and text.startswith(TEXT)
            finally:
                await pool.aclose()
    assert proxy.heads[0].startswith(b"CONNECT upstream.test:443 HTTP/1.1\r\n")
    assert b"\r\nproxy-authorization: " + BASIC.lower().encode() + b"\r\n" in proxy.heads[0].lower()
    assert len(proxy.heads) == 1 and fake.connections == 1  # one tunnel, kept alive for both
    assert len(fake.requests) == 2


BASIC = "Basic Ym9iOnMzY3JldA=="  # bob:s3cret


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
async def test_http_goes_to_the_egress_proxy_in_absolute_form(transport):
    async with FakeServer(OpenAIFake()) as fake:
        async with ForwardProxy({"upstream.test:80": ("127.0.0.1", fake_port(fake))}) as proxy:
            pool = pool_with(transport, {"HTTP_PROXY": proxy.url})
            try:
                text, finished = await collect(openai_backend("http://upstream.test", pool))
            finally:
                await pool.aclose()
    assert finished and text.startswith(TEXT)
    line = proxy.heads[0].split(b"\r\n")[0]
    assert line.startswith(b"POST http://upstream.test") and line.endswith(b"/v1/chat/completions HTTP/1.1")


@pytest.mark.parametrize("transport", ["native", "aiohttp"])
async def test_a_tunnel_the_proxy_refuses_is_a_typed_error_with_the_reason(transport, upstream_cert, caplog):
    async with ForwardProxy({}, auth=BASIC) as proxy:
        pool = pool_with(transport, {"HTTPS_PROXY": proxy.url}, ca_file=upstream_cert[0])
        try:
            with pytest.raises(UpstreamServerError) as info:
                await collect(openai_backend("https://upstream.test", pool))
        finally:
            await pool.aclose()
    assert str(info.value) == f"could not reach openai: the proxy {proxy.url} refused the tunnel: 407 Proxy Authentication Required"
    assert any("refused the tunnel: 407" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
async def test_a_loopback_upstream_and_no_proxy_bypass_the_egress_proxy(transport):
    async with FakeServer(OpenAIFake()) as fake:
        async with ForwardProxy({}) as proxy:
            pool = pool_with(transport, {"HTTP_PROXY": proxy.url, "NO_PROXY": "upstream.test"})
            try:
                text, finished = await collect(openai_backend(fake.url, pool))
            finally:
                await pool.aclose()
    assert finished and text.startswith(TEXT) and proxy.heads == []


# -- whatever the transport: an event-stream line that never ends ----------------------------------


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
async def test_a_line_that_never_ends_is_a_typed_error_not_unbounded_memory(transport):
    # 64 KiB chunks of one `data:` line, without end, until the client goes away: the SSE
    # decoder's line cap (8 MiB) ends the stream with EventTooLarge.
    sent = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"data: " + b"x" * (64 * 1024 - 6)
        try:
            while sent < 64 * 1024 * 1024:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
                await writer.drain()
                piece = b"x" * (64 * 1024)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = ClientPool(HttpSettings(transport=transport))  # type: ignore[arg-type]
    try:
        with pytest.raises(EventTooLarge, match="line over 8388608 bytes"):
            await collect(openai_backend(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", pool))
    finally:
        await pool.aclose()
        server.close()
    assert sent < 16 * 1024 * 1024


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
async def test_the_reason_of_a_connect_failure_is_kept_in_the_error_and_the_log(transport, caplog):
    with socket.socket() as sock:  # a port that was just free: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = ClientPool(HttpSettings(transport=transport))  # type: ignore[arg-type]
    try:
        with pytest.raises(UpstreamServerError) as info:
            await collect(openai_backend(f"http://127.0.0.1:{port}", pool))
    finally:
        await pool.aclose()
    assert str(info.value) == "could not reach openai: connect failed: Connection refused"  # no address for the client
    logged = [r.getMessage() for r in caplog.records if "could not reach openai" in r.getMessage()]
    assert logged and "Connection refused" in logged[0] and str(port) in logged[0]  # the log has the detail


# -- whatever the transport: a POST is sent once; a TLS failure says why --------------------------

SSE_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
    % len(body := b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
) + body


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
async def test_a_post_is_never_sent_twice_on_any_transport(transport):
    # The upstream reads the second request on the kept-alive connection and closes it without
    # an answer. It may have started generating: no transport may send that POST again.
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")))
                await reader.readexactly(length)
                requests.append(head)
                if len(requests) == 2:
                    return  # closes without a word
                writer.write(SSE_ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = ClientPool(HttpSettings(transport=transport))  # type: ignore[arg-type]
    try:
        b = openai_backend(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", pool)
        assert await collect(b) == ("Hi", True)
        with pytest.raises(UpstreamServerError, match="could not reach openai: "):
            await collect(b)
        assert len(requests) == 2  # the second POST arrived once, and only once
        assert await collect(b) == ("Hi", True)  # the next one goes on a new connection
    finally:
        await pool.aclose()
        server.close()
    assert len(requests) == 3


@pytest.mark.parametrize("transport", ["native", "aiohttp", "httpx"])
async def test_an_untrusted_certificate_is_refused_with_the_reason(transport, cert, caplog):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*cert)
    pool = ClientPool(HttpSettings(transport=transport))  # type: ignore[arg-type]  # certifi's CAs: ours is not among them
    try:
        async with FakeServer(OpenAIFake(), ssl_context=server_ctx) as fake:
            with pytest.raises(UpstreamServerError) as info:
                await collect(openai_backend(fake.url, pool))
    finally:
        await pool.aclose()
    assert str(info.value) == "could not reach openai: TLS certificate verification failed: self-signed certificate"
    assert fake.requests == []
    assert any("certificate verify failed" in r.getMessage() for r in caplog.records)  # the log has OpenSSL's words
