"""A client that stops reading: cut off within the bound, memory bounded, neighbours unaffected."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

import grpc
import orjson
from websockets.asyncio.client import connect

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from tests.support.procs import start_bridge, start_server
from tests.support.ws import open_ws, recv, send, start_frame


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def fast_gaps(ws_url: str, sid: str, tokens: int) -> list[float]:
    """A well-behaved client: the gaps between its token frames, in ms."""
    async with open_ws(ws_url) as ws:
        await send(ws, start_frame(sid, "Explain the water cycle", max_tokens=tokens))
        times = []
        while True:
            frame = await recv(ws)
            if frame["type"] == "token":
                times.append(time.perf_counter())
            if frame["type"] in ("done", "error"):
                break
    return [(b - a) * 1000 for a, b in zip(times, times[1:])]


async def test_a_client_that_stops_reading_is_cut_off_and_bounded_and_others_keep_their_pace():
    server = start_server("--demo-ttft-ms", "20", "--demo-tokens-per-s", "100", "--demo-jitter", "0", "--slow-client-timeout-s", "3")
    bridge = start_bridge(server.address, "--ping-interval-s", "20", "--ping-timeout-s", "1")
    try:
        baseline = await fast_gaps(bridge.address, "alone", 150)
        rss_before = rss_kb(server.popen.pid) + rss_kb(bridge.popen.pid)

        # The slow client: a tiny receive buffer, ten paced streams with long answers, and it
        # never reads a frame after the first.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", bridge.port))
        slow = await connect(bridge.address, sock=sock, max_queue=1)
        session = orjson.loads(await slow.recv())
        for i in range(10):
            await slow.send(orjson.dumps(start_frame(f"slow{i}", "Explain quantum computing", max_tokens=5000)).decode())
        started = time.monotonic()

        # The fast client streams beside it the whole time.
        gaps = await fast_gaps(bridge.address, "beside", 300)
        rss_after = rss_kb(server.popen.pid) + rss_kb(bridge.popen.pid)

        # The slow client was cut off (the bridge aborts a send blocked past the ping timeout)
        # and its session is still there to resume, its streams still generating.
        async with grpc.aio.insecure_channel(server.address) as channel:
            while True:
                state = await pb_grpc.LLMProxyStub(channel).GetSession(
                    pb.GetSessionRequest(session_id=session["session_id"], resume_token=session["resume_token"])
                )
                cut_after = time.monotonic() - started
                if not state.attached or cut_after > 10:
                    break
                await asyncio.sleep(0.1)
        assert not state.attached, f"still attached after {cut_after:.1f}s"
        assert {s.phase for s in state.streams} == {"streaming"}

        p99 = lambda g: sorted(g)[int(0.99 * (len(g) - 1))]  # noqa: E731
        print(
            f"\nfast client inter-token: alone p50 {statistics.median(baseline):.1f} p99 {p99(baseline):.1f} ms; "
            f"beside a stuck reader p50 {statistics.median(gaps):.1f} p99 {p99(gaps):.1f} ms; "
            f"server+bridge RSS {rss_before} -> {rss_after} KB; stuck reader cut off after {cut_after:.1f} s or less"
        )
        assert statistics.median(gaps) < statistics.median(baseline) * 1.2 + 1
        assert p99(gaps) < p99(baseline) * 1.5 + 5
        assert rss_after - rss_before < 30_000  # KB: bounded, not a queue per token
        slow.transport.abort()
    finally:
        bridge.stop()
        server.stop()
