"""TLS end to end with a self-signed certificate made here: wss:// at the bridge, gRPC over TLS
between bridge and server and for direct gRPC clients."""

from __future__ import annotations

import ssl

import grpc
import pytest

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from tests.integration.conftest import FAST_DEMO
from tests.support.certs import self_signed
from tests.support.procs import start_proxy
from tests.support.ws import collect, open_ws, send, start_frame, text_of


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"), "llmproxy-test")


@pytest.fixture(scope="module")
def tls_proxy(cert):
    cert_path, key_path = map(str, cert)
    p = start_proxy(
        (*FAST_DEMO, "--tls-cert", cert_path, "--tls-key", key_path),
        ("--tls-cert", cert_path, "--tls-key", key_path, "--grpc-ca", cert_path),
    )
    yield p
    p.stop()


async def test_wss_streams_through_grpc_over_tls(tls_proxy, cert):
    assert tls_proxy.ws_url.startswith("wss://")
    context = ssl.create_default_context(cafile=str(cert[0]))
    async with open_ws(tls_proxy.ws_url, ssl=context) as ws:
        await send(ws, start_frame("t", max_tokens=5))
        frames = (await collect(ws, {"t"}))["t"]
        assert frames[-1]["type"] == "done" and text_of(frames)


async def test_plain_ws_and_untrusted_clients_are_refused(tls_proxy):
    with pytest.raises(ssl.SSLCertVerificationError):
        async with open_ws(tls_proxy.ws_url, ssl=ssl.create_default_context()):
            pass
    with pytest.raises(Exception):
        async with open_ws(tls_proxy.ws_url.replace("wss://", "ws://"), open_timeout=5):
            pass


async def test_grpc_over_tls_with_the_ca_and_not_without(tls_proxy, cert):
    credentials = grpc.ssl_channel_credentials(root_certificates=cert[0].read_bytes())
    async with grpc.aio.secure_channel(tls_proxy.grpc_target, credentials) as channel:
        reply = await pb_grpc.LLMProxyStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        assert "demo" in [m.name for m in reply.models]
    async with grpc.aio.insecure_channel(tls_proxy.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.LLMProxyStub(channel).ListModels(pb.ListModelsRequest(), timeout=3)
