"""Many servers on one Redis (issue 14): a session resumed through another bridge and another
server, a server SIGKILLed under live streams, Redis stopped under live streams.

Real processes throughout: redis-server, two or three servers with `--store redis://...`,
bridges, and the Python client over WebSockets."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmproxy_client import Backoff, WSClient
from tests.support.procs import Proc, start_bridge, start_server
from tests.support.redis import RedisServer

PROMPTS = ["Explain quantum computing", "How does photosynthesis work?", "What is a black hole?"]
FAST_BACKOFF = Backoff(base_s=0.05, factor=1.6, jitter=0.2, cap_s=0.5)
PACE = ("--demo-ttft-ms", "20", "--demo-tokens-per-s", "200", "--demo-jitter", "0.2", "--resume-grace-s", "10")


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def consume(handle, counts: dict, out: dict) -> None:
    parts = []
    async for t in handle:
        parts.append(t)
        counts[handle.id] = counts.get(handle.id, 0) + 1
    out[handle.id] = "".join(parts)


async def wait_tokens(counts: dict, at_least: int) -> None:
    while min(counts.values()) < at_least:
        await asyncio.sleep(0.002)


async def expected_texts(url: str, max_tokens: int) -> list[str]:
    async with WSClient(url, reconnect=False) as client:
        handles = [client.stream(model="demo", messages=messages(p), seed=11, max_tokens=max_tokens) for p in PROMPTS]
        return ["".join([t async for t in h]) for h in handles]


def stop_all(*procs: Proc) -> None:
    for p in procs:
        p.stop()


async def test_streams_resumed_through_another_bridge_and_another_server(redis_server: RedisServer) -> None:
    """3 streams through bridge A on server 1, a drop, resumed through bridge B on server 2,
    50 times: every text equals the uninterrupted one, nothing lost, nothing repeated."""
    s1 = start_server("--store", redis_server.url, *PACE)
    s2 = start_server("--store", redis_server.url, *PACE)
    a, b = start_bridge(s1.address), start_bridge(s2.address)
    try:
        expected = await expected_texts(a.address, 60)
        assert expected == await expected_texts(b.address, 60)
        lost = duplicated = moved = 0
        for run in range(50):
            async with WSClient([a.address, b.address], backoff=FAST_BACKOFF, seed=run) as client:
                handles = [client.stream(model="demo", messages=messages(p), seed=11, max_tokens=60) for p in PROMPTS]
                counts, out = {h.id: 0 for h in handles}, {}
                readers = [asyncio.create_task(consume(h, counts, out)) for h in handles]
                await asyncio.wait_for(wait_tokens(counts, 1 + run % 25), 10)
                client.drop_connection()
                await asyncio.wait_for(asyncio.gather(*readers), 30)
                moved += client.reconnects >= 1
                for h, want in zip(handles, expected):
                    got = out[h.id]
                    duplicated += h.duplicates + (len(got) > len(want))
                    lost += got != want and len(got) <= len(want)
        print(f"\n50 resumes through the other bridge and server: lost={lost} duplicated={duplicated} moved={moved}")
        assert (lost, duplicated) == (0, 0)
        assert moved == 50
        assert any("taking over" in line for line in s1.lines + s2.lines) is False
    finally:
        stop_all(a, b, s1, s2)
