"""The Python gRPC client resumes after its connection is cut: nothing lost, nothing repeated."""

from __future__ import annotations

import asyncio

import pytest

from llmproxy_client import Backoff, LLMProxyClient, LLMProxyError
from tests.support.procs import start_server
from tests.support.relay import TcpRelay

PROMPTS = ["Explain quantum computing", "How does photosynthesis work?", "What is a black hole?"]
FAST = Backoff(base_s=0.05, factor=1.6, jitter=0.2, cap_s=0.5)


async def read_all(handles, counts, out):
    async def one(h):
        parts = []
        async for t in h:
            parts.append(t)
            counts[h.id] += 1
        out[h.id] = "".join(parts)

    await asyncio.gather(*(one(h) for h in handles))


@pytest.fixture
def server():
    s = start_server("--demo-ttft-ms", "20", "--demo-tokens-per-s", "150", "--demo-jitter", "0.2")
    yield s
    s.stop()


def start_three(client, max_tokens):
    return [client.stream(model="demo", messages=[{"role": "user", "content": p}], seed=5, max_tokens=max_tokens) for p in PROMPTS]


async def test_grpc_client_resumes_after_the_connection_is_cut(server):
    async with LLMProxyClient(server.address, reconnect=False) as direct:
        expected = []
        for h in start_three(direct, 120):
            expected.append("".join([t async for t in h]))
    relay = await TcpRelay("127.0.0.1", server.port).start()
    try:
        async with LLMProxyClient(relay.address, backoff=FAST, seed=1) as client:
            handles = start_three(client, 120)
            counts, out = {h.id: 0 for h in handles}, {}
            reader = asyncio.create_task(read_all(handles, counts, out))
            deadline = asyncio.get_running_loop().time() + 10
            while min(counts.values()) < 25:
                assert asyncio.get_running_loop().time() < deadline, f"no 25 tokens on every stream: {counts}"
                await asyncio.sleep(0.005)
            relay.cut()  # every TCP connection of the channel reset mid-stream
            await asyncio.wait_for(reader, 30)
            assert client.reconnects >= 1
            assert [out[h.id] for h in handles] == expected
            assert sum(h.duplicates for h in handles) == 0
    finally:
        await relay.close()


async def test_grpc_client_without_reconnect_reports_the_cut_as_an_error(server):
    relay = await TcpRelay("127.0.0.1", server.port).start()
    try:
        async with LLMProxyClient(relay.address, reconnect=False) as client:
            (h,) = [client.stream(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=500)]
            async for _ in h:
                relay.cut()
                break
            with pytest.raises(LLMProxyError) as err:
                await asyncio.wait_for(h.result(), 10)
            assert err.value.code == "unavailable"  # a cut stream is never reported as finished
    finally:
        await relay.close()
