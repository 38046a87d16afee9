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


async def detached_after(target: str, session: dict, started: float, deadline_s: float) -> tuple[float, pb.SessionState]:
    """Polls GetSession until the session is no longer attached (or the deadline passes): the
    seconds from `started`, and the last state."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LLMProxyStub(channel)
        request = pb.GetSessionRequest(session_id=session["session_id"], resume_token=session["resume_token"])
        while True:
            state = await stub.GetSession(request)
            elapsed = time.monotonic() - started
            if not state.attached or elapsed > deadline_s:
                return elapsed, state
            await asyncio.sleep(0.05)


async def test_a_client_that_stops_reading_is_cut_off_and_bounded_and_others_keep_their_pace():
    server = start_server("--demo-ttft-ms", "20", "--demo-tokens-per-s", "100", "--demo-jitter", "0", "--slow-client-timeout-s", "30")
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
        # Watched from the start, beside the fast client: when the slow client's session detaches.
        watcher = asyncio.create_task(detached_after(server.address, session, started, deadline_s=15))

        # The fast client streams beside it the whole time.
        gaps = await fast_gaps(bridge.address, "beside", 300)
        rss_after = rss_kb(server.popen.pid) + rss_kb(bridge.popen.pid)

        # The slow client was cut off (the bridge aborts a send blocked past the ping timeout)
        # and its session is still there to resume, its streams still generating.
        cut_after, state = await watcher
        assert not state.attached, f"still attached after {cut_after:.1f}s"
        assert {s.phase for s in state.streams} == {"streaming"}
        # The bound: its buffers (a 4 KiB receive buffer, the kernel's send buffer, the bridge's
        # 64 KiB) fill in about 2 s at 1000 frames/s (3.0-3.2 s in all, measured here), then
        # the bridge aborts a send blocked longer than the ping timeout (1 s), checked every
        # quarter of it; 6 s leaves room for a loaded machine. Never before the ping timeout.
        # The server's own slow-client timeout is 30 s here: the bridge's watchdog did it.
        assert 1.0 < cut_after < 6.0, f"the stuck reader was cut off after {cut_after:.1f} s"
        assert any("closing a connection that stopped reading" in line for line in bridge.lines), bridge.lines[-5:]

        p99 = lambda g: sorted(g)[int(0.99 * (len(g) - 1))]  # noqa: E731
        print(
            f"\nfast client inter-token: alone p50 {statistics.median(baseline):.1f} p99 {p99(baseline):.1f} ms; "
            f"beside a stuck reader p50 {statistics.median(gaps):.1f} p99 {p99(gaps):.1f} ms; "
            f"server+bridge RSS {rss_before} -> {rss_after} KB; stuck reader cut off after {cut_after:.2f} s"
        )
        assert statistics.median(gaps) < statistics.median(baseline) * 1.2 + 1
        assert p99(gaps) < p99(baseline) * 1.5 + 5
        assert rss_after - rss_before < 30_000  # KB: bounded, not a queue per token
        slow.transport.abort()
    finally:
        bridge.stop()
        server.stop()
