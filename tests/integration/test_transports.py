"""Each upstream transport over real sockets, beyond the provider cases of test_provider_driver.py:
the aiohttp transport is aiohttp's own API (no httpx in between) and trusts `ca_file`."""

from __future__ import annotations

import ssl
import subprocess
import sys

import pytest

from server.core.events import Finished, TextDelta
from server.core.request import ChatMessage, ChatRequest
from server.providers.adapter import Endpoint, Secret, Timeouts
from server.providers.base import DeploymentInfo
from server.providers.http import ClientPool, HttpBackend, HttpSettings
from server.providers.registry import providers
from tests.fakes.base import FakeServer
from tests.fakes.openai import OpenAIFake
from tests.support.certs import self_signed
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
    finally:
        await pool.aclose()
